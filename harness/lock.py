"""One live run per folder: `OUTPUT_DIR/run.lock`, taken atomically, kept alive by a heartbeat, and taken over
only from a holder that is gone."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from accelerate.utils import broadcast_object_list

from harness.checkpoint import replace_file
from harness.errors import BadInput


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

    def __init__(self, path: Path, name: str = "train.output_dir"):
        self.path, self.name = Path(path), name  # `name`: what the folder is, in the refusal
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
            raise BadInput(f"{self.name} {self.path.parent} is in use by another run: {self.describe(record)}; "
                           f"wait for it, or choose another {self.name} (a holder that is gone is taken over "
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


def hold(path: Path, accelerator, name: str, warn=print, check: Optional[Callable[[], None]] = None) -> RunLock:
    """Collective: the main process takes the lock at `path` (after `check`, which may refuse the folder); every rank
    raises BadInput if it could not."""
    lock = RunLock(path, name)
    refusal = [None]
    if accelerator.is_main_process:
        try:
            if check is not None:
                check()
            lock.acquire(warn)
        except BadInput as e:
            refusal[0] = str(e)
        except OSError as e:
            refusal[0] = f"{name} {Path(path).parent}: cannot take its lock {path}: {e}"
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise BadInput(refusal[0])
    return lock
