"""Hugging Face-format model folders (final/, best/): what they hold, written atomically by the main process."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from harness.checkpoint import agree_on_write, latest_checkpoint, replace_dir
from harness.faults import NONE as NO_FAULTS, Faults


EVALUATION = "evaluation.json"  # beside harness evaluate's files, written last: their names and sizes
TRAINING_CONFIG = "training_config.yaml"  # beside an exported model: how it was trained and its data prepared


def save_model(accelerator, model, tokenizer, path: Path, extra: Optional[dict] = None,
               training_config: Optional[str] = None, weights: Optional[Callable[[], Optional[dict]]] = None,
               faults: Faults = NO_FAULTS) -> None:
    """HF-format model + tokenizer at `path` (plus `extra` as eval_results.json and the resolved config as
    training_config.yaml, which `harness evaluate` and `harness predict` read), written by the main process.

    Every rank must call this: under ZeRO-3 `get_state_dict` gathers the partitioned weights, a
    collective that hangs if one rank skips it and writes empty tensors if nobody gathers. `weights` gives
    the state_dict to write instead of the model's own (the fp32 masters of bf16 weights).
    """
    accelerator.wait_for_everyone()
    state_dict = weights() if weights else None
    if state_dict is None:
        state_dict = accelerator.get_state_dict(model)
    tmp = path.with_name(path.name + ".tmp")
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            # save_original_format=False: keep the parameter names as they are (LayerNorm.weight), not the legacy
            # names (LayerNorm.gamma) that transformers 5 writes back for models it loaded through a renaming.
            dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), None)  # save_pretrained empties it
            accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
                tmp, state_dict=state_dict, safe_serialization=True, save_original_format=False
            )
            if weights is not None and dtype is not None:  # config.json names the parameters' dtype, not the weights'
                _set_config_dtype(tmp / "config.json", dtype)
            tokenizer.save_pretrained(tmp)
            faults.write("model", accelerator.process_index)
            if extra is not None:
                (tmp / "eval_results.json").write_text(json.dumps(extra, indent=2) + "\n")
            if training_config is not None:
                (tmp / TRAINING_CONFIG).write_text(training_config)
            replace_dir(tmp, path)
        except Exception as e:
            error = e
    agree_on_write(accelerator, error, path, functools.partial(shutil.rmtree, tmp, ignore_errors=True),
           latest_checkpoint(path.parent))


def _set_config_dtype(config: Path, dtype) -> None:
    values = json.loads(config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in values:
            values[key] = str(dtype).replace("torch.", "")
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def copy_model(accelerator, source: Path, path: Path, note: dict) -> None:
    """`path` becomes a copy of the exported model at `source`, its eval_results.json extended by `note`
    (early stopping: final/ holds the best model). Main process writes; every rank calls it."""
    tmp = path.with_name(path.name + ".tmp")
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            results = tmp / "eval_results.json"
            previous = json.loads(results.read_text()) if results.is_file() else {}
            results.write_text(json.dumps({**previous, **note}, indent=2) + "\n")
            replace_dir(tmp, path)
        except Exception as e:
            error = e
    agree_on_write(accelerator, error, path, functools.partial(shutil.rmtree, tmp, ignore_errors=True),
           latest_checkpoint(path.parent))


class Exporter:
    """What the run's model folders hold: the weights (the fp32 masters where the model computes in bf16
    weights), the tokenizer, the evaluation that chose them and the resolved config."""

    def __init__(self, accelerator, model, tokenizer, masters, training_config: str, watchdog,
                 faults: Faults = NO_FAULTS):
        self.accelerator, self.model, self.tokenizer, self.masters = accelerator, model, tokenizer, masters
        self.training_config, self.watchdog, self.faults = training_config, watchdog, faults

    def weights(self) -> Optional[dict]:
        if self.masters is None:
            return None
        return self.masters.state_dict(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))

    def export(self, path: Path, results: dict) -> None:
        """Collective: every rank calls it (ZeRO-3 gathers the weights)."""
        self.watchdog.beat()
        save_model(self.accelerator, self.model, self.tokenizer, path, extra=results,
                   training_config=self.training_config, weights=self.weights, faults=self.faults)
        self.watchdog.beat()
