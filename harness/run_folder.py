"""The run folder (`train.output_dir`): its layout, and the one place that decides about it or clears it.

    run = RunFolder(cfg.train.output_dir)
    start, checkpoint = run.decide(cfg)     # ("fresh" | "resume" | "finished", checkpoint or None), read-only
    run.begin(cfg, fresh=start == "fresh")  # main process: clear an overwritten run, write config.yaml

    OUTPUT_DIR/config.yaml              the resolved config (a resume must match it, bar the neutral keys)
    OUTPUT_DIR/metrics.jsonl            every logged record, one JSON object a line
    OUTPUT_DIR/tensorboard/             the trackers' files (TensorBoard by default)
    OUTPUT_DIR/deepspeed_config.json    the resolved DeepSpeed config, under DeepSpeed
    OUTPUT_DIR/checkpoints/step-N/      resumable state (harness.checkpoint)
    OUTPUT_DIR/best/, OUTPUT_DIR/final/ Hugging Face-format models; final/ means the run is finished

The trainer, `harness plan` (and through `harness plan --status`, the Slurm job script) all ask this class.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import yaml

from harness.checkpoint import checked_checkpoint, complete_checkpoints, latest_checkpoint
from harness.config import Config
from harness.errors import BadInput

# Keys that change how a run is driven or recorded, not what it trains: a resume may change them.
NEUTRAL_KEYS = {
    ("train", k) for k in ("output_dir", "overwrite", "log_every", "eval_batch_size", "save_every", "keep_last",
                           "resume", "best_metric", "peak_flops", "sync_debug", "report_to")
} | {("data", "num_workers")}


def _comparable(d: dict) -> dict:
    return {s: {k: v for k, v in sec.items() if (s, k) not in NEUTRAL_KEYS} for s, sec in d.items() if isinstance(sec, dict)}


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tensorboard"
        self.deepspeed_config = self.root / "deepspeed_config.json"
        self.checkpoints = self.root / "checkpoints"
        self.best = self.root / "best"
        self.final = self.root / "final"

    def is_finished(self) -> bool:
        return (self.final / "config.json").is_file()

    def decide(self, cfg: Config, warn: Callable[[str], None] = print) -> tuple[str, Optional[Path]]:
        """Read-only look at the folder. Returns (what, checkpoint):

        - ("finished", None): a finished run of this config is there; nothing to train;
        - ("resume", path): continue from that complete checkpoint;
        - ("fresh", None): start from scratch (`begin` then removes an old run, if overwrite allowed it).
        """
        t = cfg.train
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"train.output_dir {self.root} exists and is not a folder")
        explicit = t.resume not in ("auto", "none")
        has_run = self.config.is_file() or bool(complete_checkpoints(self.root))
        if self.config.is_file():
            try:
                previous = yaml.safe_load(self.config.read_text()) or {}
            except yaml.YAMLError:
                previous = None
            if previous is None or _comparable(previous) != _comparable(cfg.to_dict()):
                if t.overwrite:
                    return "fresh", None
                changed = "unreadable config.yaml" if previous is None else ", ".join(sorted(
                    f"{s}.{k}" for s, sec in _comparable(cfg.to_dict()).items() for k, v in sec.items()
                    if (previous.get(s) or {}).get(k, object()) != v
                ))
                raise BadInput(
                    f"train.output_dir {self.root} holds a run of a different config (differs in: {changed}); "
                    "choose another output_dir or set train.overwrite=true"
                )
        if explicit:
            return "resume", checked_checkpoint(Path(t.resume))
        if t.resume == "none":
            if has_run and not t.overwrite:
                raise BadInput(f"train.output_dir {self.root} already holds a run and train.resume=none; "
                               "use train.resume=auto to continue it or train.overwrite=true to start over")
            return "fresh", None
        if self.is_finished():
            return "finished", None
        latest = latest_checkpoint(self.root, warn)
        return ("resume", latest) if latest else ("fresh", None)

    def status(self, cfg: Config) -> str:
        """One word (and a path) for scripts: `finished`, `resume PATH` or `fresh`."""
        start, checkpoint = self.decide(cfg, warn=lambda message: None)
        return f"resume {checkpoint}" if start == "resume" else start

    def clear(self) -> None:
        """Remove a previous run's outputs (only after train.overwrite=true allowed it)."""
        for folder in (self.checkpoints, self.best, self.final, self.tensorboard):
            shutil.rmtree(folder, ignore_errors=True)
        for f in (self.metrics, self.config, self.deepspeed_config):
            f.unlink(missing_ok=True)

    def begin(self, cfg: Config, fresh: bool) -> None:
        """Main process, before anything else is written: clear an overwritten run, record the config."""
        if fresh:
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(cfg.to_yaml())
