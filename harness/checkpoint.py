"""What a run writes and when it may write it: the output folder guard and the final HF-format model.

Every write here is made in a temporary folder and renamed into place, so a crash never leaves a
half-written model where a finished one is expected.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from harness.config import Config
from harness.errors import BadInput

# Keys that change how a run is driven, not what it produces.
_NEUTRAL_KEYS = {("train", "overwrite"), ("train", "log_every"), ("data", "num_workers"), ("train", "eval_batch_size")}


def _comparable(d: dict) -> dict:
    return {s: {k: v for k, v in sec.items() if (s, k) not in _NEUTRAL_KEYS} for s, sec in d.items() if isinstance(sec, dict)}


def check_output_dir(cfg: Config) -> str:
    """Decide what to do with train.output_dir. Returns 'fresh' or 'finished'.

    A folder holding a run of another config is refused unless train.overwrite=true: results are never
    silently replaced. A finished run of the same config is 'finished' (nothing to train).
    """
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"train.output_dir {out} exists and is not a folder")
    saved = out / "config.yaml"
    if not saved.is_file() or cfg.train.overwrite:
        return "fresh"
    try:
        previous = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        raise BadInput(f"{saved} is not valid YAML; set train.overwrite=true to start a new run in {out}") from None
    if _comparable(previous) != _comparable(cfg.to_dict()):
        changed = sorted(
            f"{s}.{k}"
            for s, sec in _comparable(cfg.to_dict()).items()
            for k, v in sec.items()
            if (previous.get(s) or {}).get(k, object()) != v
        )
        raise BadInput(
            f"train.output_dir {out} holds a run of a different config (differs in: {', '.join(changed) or 'sections'}); "
            "choose another output_dir or set train.overwrite=true"
        )
    return "finished" if (out / "final" / "config.json").is_file() else "fresh"


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished tmp folder into place; the old one is removed only after the new one is there."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_model(accelerator, model, tokenizer, path: Path) -> None:
    """HF-format model + tokenizer at `path`, written by the main process.

    Every rank must call this: under ZeRO-3 `get_state_dict` gathers the partitioned weights, a
    collective that hangs if one rank skips it and writes empty tensors if nobody gathers.
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, path)
    accelerator.wait_for_everyone()
