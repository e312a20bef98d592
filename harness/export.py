"""Hugging Face-format model folders (final/, best/): what they hold, written atomically by the main process."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import yaml
from transformers.utils import logging as transformers_logging

from harness import __version__
from harness.checkpoint import agree_on_write, latest_checkpoint, replace_dir
from harness.config import METRICS, Config
from harness.faults import NONE as NO_FAULTS, Faults


EVALUATION = "evaluation.json"  # beside harness evaluate's files, written last: their names and sizes
TRAINING_CONFIG = "training_config.yaml"  # beside an exported model: how it was trained and its data prepared


def save_model(accelerator, model, tokenizer, path: Path, extra: Optional[dict] = None,
               training_config: Optional[str] = None, weights: Optional[Callable[[], Optional[dict]]] = None,
               faults: Faults = NO_FAULTS, card: Optional[str] = None) -> None:
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
            with quiet_progress():  # one bar per export, for a file written in a second, is noise in a run's log
                accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
                    tmp, state_dict=state_dict, safe_serialization=True, save_original_format=False
                )
            # config.json names the parameters' dtype, not the weights'; and the threshold a multi-label model decides at
            _edit_config(tmp / "config.json", dtype if weights is not None else None, (extra or {}).get("threshold"))
            tokenizer.save_pretrained(tmp)
            faults.write("model", accelerator.process_index)
            if extra is not None:
                (tmp / "eval_results.json").write_text(json.dumps(extra, indent=2) + "\n")
            if training_config is not None:
                (tmp / TRAINING_CONFIG).write_text(training_config)
            if card is not None:
                (tmp / "README.md").write_text(card)
            replace_dir(tmp, path)
        except Exception as e:
            error = e
    agree_on_write(accelerator, error, path, functools.partial(shutil.rmtree, tmp, ignore_errors=True),
           latest_checkpoint(path.parent))


@contextlib.contextmanager
def quiet_progress():
    """transformers' progress bars off for a while, as they were after."""
    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            transformers_logging.enable_progress_bar()


def _edit_config(config: Path, dtype, threshold) -> None:
    values = json.loads(config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in values and dtype is not None:
            values[key] = str(dtype).replace("torch.", "")
    if threshold is not None:
        values["decision_threshold"] = threshold
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

    def __init__(self, accelerator, model, tokenizer, masters, cfg: Config, launch: dict, watchdog,
                 faults: Faults = NO_FAULTS):
        self.accelerator, self.model, self.tokenizer, self.masters = accelerator, model, tokenizer, masters
        self.cfg, self.launch, self.watchdog, self.faults = cfg, launch, watchdog, faults

    def weights(self) -> Optional[dict]:
        if self.masters is None:
            return None
        return self.masters.state_dict(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))

    def export(self, path: Path, results: dict) -> None:
        """Collective: every rank calls it (ZeRO-3 gathers the weights)."""
        self.watchdog.beat()
        save_model(self.accelerator, self.model, self.tokenizer, path, extra=results, training_config=self.cfg.to_yaml(),
                   weights=self.weights, faults=self.faults, card=model_card(self.cfg, self.launch, results, path))
        self.watchdog.beat()


def model_card(cfg: Config, launch: dict, results: dict, path: Path) -> str:
    """README.md of an exported model: the Hub's metadata block (base model, dataset, task, the metrics of the
    evaluation that chose it) and, in words, how it was trained and launched."""
    m, d, t = cfg.model, cfg.data, cfg.train
    name = f"{Path(t.output_dir).name}/{path.name}"
    metrics = [{"type": k, "value": v, "name": f"eval {k}"} for k, v in results.items()
               if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
    dataset = {"name": d.dataset, "type": d.dataset, "split": d.eval_split, **({"config": d.dataset_config}
                                                                              if d.dataset_config else {})}
    metadata = {"library_name": "transformers", "pipeline_tag": "text-classification", "tags": ["harness"],
                "model-index": [{"name": name, "results": [{"task": {"type": "text-classification"},
                                                            "dataset": dataset, "metrics": metrics}]}]}
    if _on_the_hub(m.name_or_path):
        metadata["base_model"] = m.name_or_path
    if _on_the_hub(d.dataset):
        metadata["datasets"] = [d.dataset]
    hyper = {"learning rate": t.lr, "epochs": t.epochs, "max steps": t.max_steps, "batch per device": t.per_device_batch_size,
             "gradient accumulation": t.grad_accum_steps, "warmup steps": t.warmup_steps, "weight decay": t.weight_decay,
             "max gradient norm": t.max_grad_norm, "max length": d.max_length, "truncation": d.truncation, "seed": t.seed}
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"`{m.name_or_path}` fine-tuned for sequence classification on `{d.dataset}` with harness {__version__}.",
             f"Labels: {', '.join(m.label_names or [f'LABEL_{i}' for i in range(m.num_labels)])}.", "",
             "## Evaluation", "", "| metric | value |", "| --- | --- |",
             *(f"| {x['type']} | {x['value']:.4f} |" for x in metrics), "", f"On the `{d.eval_split}` split"
             + (f" (step {results['step']})." if "step" in results else "."), "", "## Training", "",
             *(f"- {k}: {v}" for k, v in hyper.items() if v is not None), "",
             f"Launched on {launch['processes']} process(es), {launch['parallelism']}, precision {launch['precision']}. "
             f"`{TRAINING_CONFIG}` beside this file holds the whole resolved config.", ""]
    return "\n".join(lines)


def _on_the_hub(name: str) -> bool:
    """A hub id (org/name or name), not a local path, a package model or harness's synthetic data."""
    return not (name == "synthetic" or name.startswith(("package:", ".", "/", "~")) or Path(name).exists())
