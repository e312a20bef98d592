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
    OUTPUT_DIR/launches.jsonl           one line when each launch starts (hardware, processes) and one when it ends
    OUTPUT_DIR/run.lock                 held by the live run's main process (RunLock): one run per folder
    OUTPUT_DIR/stop_reason.txt          why the last run stopped without finishing (stall, full disk, ...)

The trainer, `harness plan` (and through `harness plan --status`, the Slurm job script) all ask this class.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import yaml
from accelerate.utils import broadcast_object_list

from harness.checkpoint import checked_checkpoint, latest_checkpoint, replace_file
from harness.config import Config
from harness.errors import BadInput
from harness.lock import RunLock

# Keys that change how a run is driven or recorded, not what it trains: a resume may change them.
NEUTRAL_KEYS = {
    ("train", k) for k in ("output_dir", "overwrite", "log_every", "eval_batch_size", "save_every", "keep_last",
                           "resume", "best_metric", "peak_flops", "sync_debug", "report_to", "stall_timeout_s",
                           "cuda_graphs")  # how the same steps are launched: a run resumes with or without graphs
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
        self.lock = self.root / "run.lock"
        self.stop_reason = self.root / "stop_reason.txt"
        self.launches = self.root / "launches.jsonl"
        self.old_launches = self.root / "sessions.jsonl"  # the log's name in harness 0.1

    def check_is_folder(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"train.output_dir {self.root} exists and is not a folder")

    def is_finished(self) -> bool:
        return (self.final / "config.json").is_file()

    def holds_results(self) -> bool:
        """Whether a run trained anything here: a logged step, a checkpoint (even unfinished), best/ or final/.
        A folder without any (a run refused or failed before its first logged step) has nothing to lose."""
        logged = self.metrics.is_file() and self.metrics.stat().st_size > 0
        checkpoint = self.checkpoints.is_dir() and any(self.checkpoints.iterdir())
        return logged or checkpoint or self.best.exists() or self.final.exists()

    def decide(self, cfg: Config, warn: Optional[Callable[[str], None]] = None) -> tuple[str, Optional[Path]]:
        """Read-only look at the folder. Returns (what, checkpoint):

        - ("finished", None): a finished run of this config is there; nothing to train;
        - ("resume", path): continue from that complete checkpoint;
        - ("fresh", None): start from scratch (`begin` then removes an old run, if overwrite allowed it).
        """
        t = cfg.train
        self.check_is_folder()
        explicit = t.resume not in ("auto", "none")
        has_run = self.holds_results()
        if self.config.is_file():
            try:
                previous = yaml.safe_load(self.config.read_text()) or {}
            except yaml.YAMLError:
                previous = None
            differs = previous is None or _comparable(previous) != _comparable(cfg.to_dict())
            if differs and t.overwrite:
                return "fresh", None
            if differs and not has_run and warn is not None:  # e.g. the last try stopped at a bad input
                warn(f"{self.root} holds the config of a run that trained nothing (no logged step, checkpoint or "
                     "model): this config replaces it")
            elif differs and has_run:
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
        start, checkpoint = self.decide(cfg)
        return f"resume {checkpoint}" if start == "resume" else start

    def lock_status(self) -> str:
        """Who holds the folder's lock, in words (for `harness plan`)."""
        lock = RunLock(self.lock)
        record = lock.read()
        if record is None:
            return "free"
        gone = lock.gone_reason(record)
        if gone:
            return f"left by {RunLock.describe(record)}, whose holder is gone ({gone}): the next run takes it over"
        return f"held by a live run: {RunLock.describe(record)}; a run started now is refused"

    def clear(self) -> None:
        """Remove a previous run's outputs (only after train.overwrite=true allowed it)."""
        for folder in (self.checkpoints, self.best, self.final, self.tensorboard):
            shutil.rmtree(folder, ignore_errors=True)
        for f in (self.metrics, self.config, self.deepspeed_config, self.stop_reason, self.launches, self.old_launches):
            f.unlink(missing_ok=True)

    def begin(self, cfg: Config, fresh: bool) -> None:
        """Main process, before anything else is written: clear an overwritten run, record the config."""
        if fresh:
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_reason.unlink(missing_ok=True)  # this run's own reason, if any, replaces the last one's
        self.config.write_text(cfg.to_yaml())

    def record_launch(self, **fields) -> None:
        """Main process: a line of launches.jsonl (`started` with the hardware, or `ended`), for `harness report`."""
        try:
            with self.launches.open("a") as f:
                f.write(json.dumps({"time": time.time(), **fields}) + "\n")
        except OSError:  # informational: a full disk must not hide the error that stops the run
            pass

    def record_stop(self, reason: str) -> None:
        """Why the run stopped without finishing, for the job script and the user (any rank may write it)."""
        try:
            replace_file(self.stop_reason, reason.rstrip() + "\n")
        except OSError:  # a full disk may be the very reason: stderr has the line anyway
            pass

    def hold(self, accelerator, warn=print) -> RunLock:
        """Collective: the main process takes the folder's lock; every rank raises BadInput if it could not."""
        lock = RunLock(self.lock)
        refusal = [None]
        if accelerator.is_main_process:
            try:
                self.check_is_folder()
                lock.acquire(warn)
            except BadInput as e:
                refusal[0] = str(e)
            except OSError as e:
                refusal[0] = f"train.output_dir {self.root}: cannot take its lock {self.lock}: {e}"
        if accelerator.num_processes > 1:
            broadcast_object_list(refusal)
        if refusal[0] is not None:
            raise BadInput(refusal[0])
        return lock
