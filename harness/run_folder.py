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
    OUTPUT_DIR/harness-run.json         marks the folder as a run's: the entries above that harness wrote here

harness removes only entries its marker names (a fresh start with train.overwrite=true), never by following a link,
and refuses to start into a folder where files of others stand at those names.

The trainer, `harness plan` (and through `harness plan --status`, the Slurm job script) all ask this class.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from harness.checkpoint import checked_checkpoint, latest_checkpoint, replace_file
from harness.config import Config
from harness.errors import BadInput
from harness.lock import RunLock, hold
from harness.recipes import read_yaml_file

# Keys that change how a run is driven or recorded, not what it trains: a resume may change them.
NEUTRAL_KEYS = {
    ("train", k) for k in ("output_dir", "overwrite", "log_every", "eval_batch_size", "save_every", "keep_last",
                           "resume", "best_metric", "peak_flops", "sync_debug", "record_examples", "report_to", "stall_timeout_s",
                           "cuda_graphs")  # how the same steps are launched: a run resumes with or without graphs
} | {("data", "num_workers")}


MARKER = "harness-run.json"
# What harness writes at the top of a run folder: the only names it ever removes there (`report.html` is harness
# report's default page; `sessions.jsonl` the launch log of harness 0.1).
ENTRIES = ("config.yaml", "metrics.jsonl", "tensorboard", "deepspeed_config.json", "checkpoints", "best", "final",
           "launches.jsonl", "sessions.jsonl", "run.lock", "stop_reason.txt", "report.html", MARKER)
REPOSITORY = Path(__file__).resolve().parents[1]


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

    def check_usable(self) -> None:
        """Refuse what can never be a run folder: a file, the filesystem root, the home folder, harness's checkout."""
        if self.root.exists() and not self.root.is_dir():
            raise BadInput(f"train.output_dir {self.root} exists and is not a folder")
        where = self.root.resolve()
        forbidden = {Path(where.anchor): "the filesystem root", Path.home().resolve(): "your home folder"}
        if (REPOSITORY / "pyproject.toml").is_file():
            forbidden[REPOSITORY] = "harness's own repository"
        if where in forbidden:
            raise BadInput(f"train.output_dir {self.root} is {forbidden[where]}: give the run a folder of its own")

    def owned(self) -> set[str]:
        """The entries harness wrote here: those its marker names; in a folder of harness 0.1 (a config.yaml of
        harness's sections, no marker), the harness names it holds; else none."""
        try:
            entries = json.loads((self.root / MARKER).read_text())["entries"]
            return set(entries) & set(ENTRIES) if isinstance(entries, list) else set()
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            return set()  # a marker that does not parse owns nothing: never a reason to delete
        try:
            legacy = read_yaml_file(self.config, str(self.config))
        except (BadInput, yaml.YAMLError):
            return set()
        if not isinstance(legacy, dict) or not {"model", "data", "train"} <= set(legacy):
            return set()
        return {p.name for p in self.root.iterdir() if p.name in ENTRIES}

    def check_fresh(self) -> None:
        """A fresh start writes harness's entries: refused where files harness did not write stand at their names."""
        if not self.root.is_dir():
            return
        owned = self.owned() | {self.lock.name}  # the lock is this run's own
        others = sorted(p.name for p in self.root.iterdir() if p.name in ENTRIES and p.name not in owned)
        if others:
            raise BadInput(f"train.output_dir {self.root} is not a harness run folder and holds {', '.join(others)}, "
                           f"which a run would write over: choose an empty or new folder")

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
        self.check_usable()
        explicit = t.resume not in ("auto", "none")
        has_run = self.holds_results()
        if self.config.is_file():
            try:
                previous = read_yaml_file(self.config, str(self.config)) or {}
            except (BadInput, yaml.YAMLError):
                previous = None
            previous = previous if isinstance(previous, dict) else None
            differs = previous is None or _comparable(previous) != _comparable(cfg.to_dict())
            if differs and t.overwrite:
                return self._fresh()
            if differs and not has_run and warn is not None and self.config.name in self.owned():  # a refused try
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
            return self._fresh()
        if self.is_finished():
            return "finished", None
        latest = latest_checkpoint(self.root, warn)
        return ("resume", latest) if latest else self._fresh()

    def _fresh(self) -> tuple[str, None]:
        self.check_fresh()  # every rank, and `harness plan`, before anything is written
        return "fresh", None

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
        """Remove a previous run's outputs (only after train.overwrite=true allowed it): the entries harness wrote,
        a link as a link (never what it points to); the live lock and the marker stay."""
        for name in sorted(self.owned() - {self.lock.name, MARKER}):
            path = self.root / name
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            elif path.is_dir():
                shutil.rmtree(path)

    def claim(self) -> None:
        """Write the marker: the entries harness wrote before, and every harness name not taken by another's file."""
        free = {name for name in ENTRIES if not (self.root / name).exists() and not (self.root / name).is_symlink()}
        entries = sorted(self.owned() | free | {self.lock.name, MARKER})
        replace_file(self.root / MARKER, json.dumps({"written_by": "harness", "entries": entries}, indent=1) + "\n")

    def begin(self, cfg: Config, fresh: bool) -> None:
        """Main process, before anything else is written: clear an overwritten run, mark the folder, record the config."""
        if fresh:
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        self.claim()
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
        return hold(self.lock, accelerator, "train.output_dir", warn, check=self.check_usable)
