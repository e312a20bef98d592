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
    OUTPUT_DIR/sessions.jsonl           one line when each launch starts (hardware, processes) and one when it ends
    OUTPUT_DIR/run.lock                 held by the live run's main process (RunLock): one run per folder
    OUTPUT_DIR/stop_reason.txt          why the last run stopped without finishing (stall, full disk, ...)

The trainer, `harness plan` (and through `harness plan --status`, the Slurm job script) all ask this class.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import yaml

from harness.checkpoint import checked_checkpoint, latest_checkpoint
from harness.config import Config
from harness.errors import BadInput

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
        self.sessions = self.root / "sessions.jsonl"

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

    def decide(self, cfg: Config, warn: Callable[[str], None] = print) -> tuple[str, Optional[Path]]:
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
            if differs and not has_run:  # e.g. the last try stopped at a bad input: its config.yaml is all it left
                warn(f"{self.root} holds the config of a run that trained nothing (no logged step, checkpoint or "
                     "model): this config replaces it")
            elif differs:
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
        for f in (self.metrics, self.config, self.deepspeed_config, self.stop_reason, self.sessions):
            f.unlink(missing_ok=True)

    def begin(self, cfg: Config, fresh: bool) -> None:
        """Main process, before anything else is written: clear an overwritten run, record the config."""
        if fresh:
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        self.stop_reason.unlink(missing_ok=True)  # this run's own reason, if any, replaces the last one's
        self.config.write_text(cfg.to_yaml())

    def record_session(self, **fields) -> None:
        """Main process: a line of sessions.jsonl (`started` with the hardware, or `ended`), for `harness report`."""
        try:
            with self.sessions.open("a") as f:
                f.write(json.dumps({"time": time.time(), **fields}) + "\n")
        except OSError:  # informational: a full disk must not hide the error that stops the run
            pass

    def record_stop(self, reason: str) -> None:
        """Why the run stopped without finishing, for the job script and the user (any rank may write it)."""
        try:
            replace_file(self.stop_reason, reason.rstrip() + "\n")
        except OSError:  # a full disk may be the very reason: stderr has the line anyway
            pass


def replace_file(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it into place: a reader sees the old file or the new, whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- one run per folder


def _process_start(pid: int) -> str | None:
    """The start time of a process on this host (Linux), to tell a live holder from a reused process id."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return started is None or _process_start(pid) in (None, started)


class RunLock:
    """`OUTPUT_DIR/run.lock`: the main process of the one live run of a folder holds it.

    Taken by creating the file with O_CREAT|O_EXCL (atomic on local filesystems and on NFSv3 and later, unlike
    flock), before the run writes anything; it names the holder (host, process id, Slurm job, since when) and
    carries a heartbeat that a thread of the holder rewrites every HEARTBEAT_S seconds. A second run is refused
    (BadInput, exit 2) naming the holder. A lock is taken over, with a warning, when its holder is gone: a
    process on this host that no longer exists, or on any host a heartbeat older than STALE_S seconds (a
    holder killed with `kill -9`, or whose node died). A requeued Slurm job whose previous incarnation still
    holds the lock waits up to STALE_S for it to be released or go stale.
    """

    HEARTBEAT_S = 30.0
    STALE_S = 300.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # -- reading
    def read(self) -> dict | None:
        """The holder's record, None when there is no lock; a record that does not parse is {}."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            return record if isinstance(record, dict) else {}
        except ValueError:
            return {}

    @staticmethod
    def describe(record: dict, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if not record:
            return "an unreadable lock record"
        slurm = f", Slurm job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
        beat = now - float(record.get("heartbeat", 0))
        return f"host {record.get('host')}, pid {record.get('pid')}{slurm}, since {since} (heartbeat {beat:.0f} s ago)"

    def gone_reason(self, record: dict, now: float | None = None) -> str | None:
        """Why the holder of `record` is gone (so the lock may be taken over), or None if it may be alive."""
        now = time.time() if now is None else now
        if not record:
            return "its record is unreadable (a write cut short)"
        beat = now - float(record.get("heartbeat", 0))
        if record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", -1)), record.get("started")):
            return "its process no longer exists on this host"
        if beat > self.STALE_S:
            return f"its heartbeat is {beat:.0f} s old (more than {self.STALE_S:.0f} s)"
        return None

    # -- taking, keeping, releasing
    def _record(self, since: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": since, "heartbeat": time.time(),
                "token": self.token}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self.since = time.time()
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(self.since), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self, warn=print, wait_for_own_job: float | None = None) -> None:
        """Take the lock or raise BadInput naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        wait_for_own_job = self.STALE_S + self.HEARTBEAT_S if wait_for_own_job is None else wait_for_own_job
        deadline = time.monotonic() + wait_for_own_job
        told = False
        while not self._create():
            record = self.read()
            if record is None:  # released between our try and our read
                continue
            reason = self.gone_reason(record)
            if reason is not None:
                if self._take_over(record):
                    warn(f"harness: warning: took over the lock {self.path} of {self.describe(record)}: {reason}")
                    break
                continue
            job = os.environ.get("SLURM_JOB_ID")
            if job and record.get("slurm_job_id") == job and time.monotonic() < deadline:
                if not told:  # a requeued job whose previous incarnation is still exiting
                    warn(f"harness: waiting for the previous run of Slurm job {job} to release {self.path} "
                         f"({self.describe(record)})")
                    told = True
                time.sleep(min(5.0, self.HEARTBEAT_S))
                continue
            raise BadInput(f"train.output_dir {self.path.parent} is in use by another run: {self.describe(record)}; "
                           f"wait for it, or choose another train.output_dir (a holder that is gone is taken over "
                           f"automatically: at once on its host, after {self.STALE_S:.0f} s elsewhere)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="harness-run-lock", daemon=True)
        self._thread.start()

    def _take_over(self, stale: dict) -> bool:
        """Move the stale lock aside (atomic rename: one contender wins) and create ours."""
        aside = self.path.with_name(f"{self.path.name}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != stale:  # a contender took it over between our read and our rename: give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def owned(self) -> bool:
        record = self.read()
        return bool(record) and record.get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            if not self.owned():
                return  # taken over (we were judged gone): never write over the new holder's record
            try:
                replace_file(self.path, json.dumps(self._record(self.since)))
            except OSError:  # a full disk: try again at the next beat
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)
        self.held = False


def hold_run_folder(run: RunFolder, accelerator, warn=print) -> RunLock:
    """Collective: the main process takes the run folder's lock; every rank raises BadInput if it could not."""
    from accelerate.utils import broadcast_object_list

    lock = RunLock(run.lock)
    refusal = [None]
    if accelerator.is_main_process:
        try:
            run.check_is_folder()
            lock.acquire(warn)
        except BadInput as e:
            refusal[0] = str(e)
        except OSError as e:
            refusal[0] = f"train.output_dir {run.root}: cannot take its lock {run.lock}: {e}"
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise BadInput(refusal[0])
    return lock
