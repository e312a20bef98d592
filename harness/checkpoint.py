"""Resumable checkpoints: when a run writes them, how (atomically, every rank agreeing), and which one resumes.

    OUTPUT_DIR/checkpoints/step-00000120/       Accelerate's save_state (model, optimizer, scheduler, every
                                                rank's RNG) + progress.json + COMPLETE.json

Every folder is written under a `.tmp` name and renamed into place once whole; a checkpoint's
COMPLETE.json (written last) lists each file's size. A checkpoint without it, or whose files do not match
it, is never loaded: a `kill -9` at any moment leaves the previous complete checkpoint usable.

A write that fails (a full disk, a quota, an I/O error) on any rank stops every rank: the ranks agree on it
by an all-reduce after each phase of the write, the partial `.tmp` folder is removed, older checkpoints
are untouched (pruning runs only after a newer one is complete), and WriteFailed names the path and error.
Tests break writes at named points through harness.faults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from harness.distributed import failing_rank
from harness.errors import BadInput, WriteFailed, first_line
from harness.faults import NONE as NO_FAULTS, Faults

COMPLETE = "COMPLETE.json"
PROGRESS = "progress.json"


@dataclass
class Progress:
    """Where training stands after `step` optimizer steps: enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # samples of `epoch` already consumed, all ranks together
    samples_seen: int = 0
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0  # early stopping's count (train.early_stopping_patience)
    world_size: int = 1
    global_batch: int = 0
    sharding: Optional[str] = None  # the parallelism that wrote it (distributed.sharding), None for DDP

    def advance(self, global_batch: int, epoch_size: int) -> None:
        """One optimizer step done: it consumed the epoch's next global batch (fewer at its end), all ranks together."""
        self.samples_seen += min(global_batch, epoch_size - self.position)
        self.step, self.position = self.step + 1, min(self.position + global_batch, epoch_size)

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0


# ---------------------------------------------------------------- finding checkpoints


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def verify(path: Path, manifest_name: str = COMPLETE) -> Optional[str]:
    """None if the write at `path` is complete and its files are whole (as its manifest, written last, lists them),
    else the reason it is not."""
    marker = path / manifest_name
    if not marker.is_file():
        return f"no {manifest_name} (unfinished write)"
    try:
        manifest = json.loads(marker.read_text())["files"]
        manifest = {str(rel): int(size) for rel, size in manifest.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest_name} is corrupt"
    for rel, size in manifest.items():
        f = path / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, expected {size} (truncated or altered)"
    return None


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step number, never by modification time)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return [p for p in dirs if verify(p) is None]


def latest_checkpoint(out: Path, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest complete checkpoint under `out`; `warn` hears of each newer one that is skipped, and why."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    for p in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        reason = "unfinished write" if p.name.endswith(".tmp") else verify(p)
        if reason is None:
            return p
        if warn is not None:
            warn(f"harness: warning: skipping checkpoint {p}: {reason}")
    return None


def checked_checkpoint(path: Path) -> Path:
    """A checkpoint the user named: refuse, don't skip, when it cannot be used."""
    if not path.is_dir():
        raise BadInput(f"train.resume: checkpoint folder not found: {path}")
    reason = verify(path)
    if reason:
        raise BadInput(f"train.resume: checkpoint {path} is incomplete or corrupt: {reason}")
    return path


def read_progress(path: Path) -> Progress:
    """progress.json, every field of the type and range a run writes, or BadInput naming the first that is not."""
    try:
        values = json.loads((path / PROGRESS).read_bytes())
        progress = Progress(**values)
    except (OSError, ValueError, TypeError) as e:
        raise BadInput(f"checkpoint {path}: cannot read {PROGRESS}: {first_line(e)}") from None
    for f in dataclasses.fields(Progress):
        value = getattr(progress, f.name)
        if f.name == "best_value":
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == value)
        elif f.name == "sharding":
            ok = value is None or isinstance(value, str)
        else:
            least = 1 if f.name == "world_size" else 0
            ok = (value is None and f.name == "best_step") or (type(value) is int and value >= least)
        if not ok:
            raise BadInput(f"checkpoint {path}: {PROGRESS} has {f.name}={str(value)[:40]!r}, which no run writes")
    return progress


# ---------------------------------------------------------------- writing


def write_manifest(folder: Path, about: dict, before=lambda: None) -> None:
    """Sync every file of `folder`, then write its COMPLETE.json (`about` and each file's size) last; `before`
    runs just before that (a test's fault)."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    for rel in files:
        with open(folder / rel, "rb") as fh:
            os.fsync(fh.fileno())
    before()
    _fsync_write(folder / COMPLETE, json.dumps({**about, "files": files}, indent=2))


def replace_file(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it into place: a reader sees the old file or the new, whole."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def agree_on_write(accelerator, error: Optional[BaseException], path: Path, cleanup=None, keep: Optional[Path] = None) -> None:
    """Collective, after each phase of a write: if it failed on any rank, every rank raises WriteFailed
    (the rank it failed on with its own error), after the main process ran `cleanup`."""
    failed_rank = failing_rank(accelerator, error is not None)
    if failed_rank < 0:
        return
    if accelerator.is_main_process and cleanup is not None:
        cleanup()
    if error is None:
        why = f"the write failed on rank {failed_rank} (its own line says why)"
    else:  # torch.save's own message for a full disk is cryptic ("unexpected pos"): say how much space is left
        why = first_line(error) if isinstance(error, OSError) else f"{type(error).__name__}: {first_line(error)}"
        try:
            why += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there)"
        except OSError:
            pass
    kept = f"; the newest complete checkpoint is intact: {keep}" if keep else "; no complete checkpoint yet"
    raise WriteFailed(f"could not write {path}: {why}{kept}; free space (or fix the storage) and run again to resume")


def save_checkpoint(accelerator, out: Path, progress: Progress, keep_last: int, faults: Faults = NO_FAULTS) -> Path:
    """Resumable state for `progress.step`. Every rank must call it (DeepSpeed's save is collective)."""
    final = checkpoint_dir(out, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    rank, step = accelerator.process_index, progress.step
    previous = latest_checkpoint(out)
    remove_tmp = functools.partial(shutil.rmtree, tmp, ignore_errors=True)
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            faults.write("mkdir", rank, step)
        except Exception as e:
            error = e
    agree_on_write(accelerator, error, final, remove_tmp, previous)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        faults.write("state", rank, step)
    except BaseException as e:  # a full disk: OSError, torch.save's RuntimeError, SafetensorError, and FSDP2's
        if isinstance(e, (KeyboardInterrupt, SystemExit)):  # checkpointing gathers the ranks' errors into a
            raise  # BaseException of its own
        error = e
    agree_on_write(accelerator, error, final, remove_tmp, previous)
    if accelerator.is_main_process:
        try:
            with open(tmp / PROGRESS, "w") as f:  # a write cut short leaves a partial file, as a full disk does
                faults.write("progress", rank, step)
                f.write(json.dumps(asdict(progress), indent=2))
                f.flush()
                os.fsync(f.fileno())
            write_manifest(tmp, {"step": progress.step}, lambda: faults.write("complete", rank, step))
            faults.write("rename", rank, step)
            replace_dir(tmp, final)
            _fsync_dir(final.parent)
        except Exception as e:
            error = e
    agree_on_write(accelerator, error, final, remove_tmp, previous)
    if accelerator.is_main_process:
        prune(out, keep_last)  # only now that the new checkpoint is complete
    accelerator.wait_for_everyone()
    return final


def prune(out: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and leftovers of killed writes."""
    complete = complete_checkpoints(out)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[-1] if complete else None
    for p in (Path(out) / "checkpoints").glob("step-*"):
        if p.is_dir() and p not in complete and (newest is None or p.name < newest.name):
            shutil.rmtree(p, ignore_errors=True)
    for p in (Path(out) / "checkpoints").glob("universal-step-*"):  # a converted copy goes with its checkpoint
        source = p.parent / p.name.removeprefix("universal-").removesuffix(".tmp")
        if p.is_dir() and not source.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished tmp folder into place; the old one is removed only after the new one is there (and
    put back if the new one cannot be moved in)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """When a run writes resumable state: every `save_every` steps or epochs (train.save_every), on a stop
    signal, and never from poisoned weights (the non-finite guard is asked first); keeps the newest `keep_last`."""

    def __init__(self, accelerator, run_root: Path, save_every, keep_last: int, global_batch: int, sharded: Optional[str],
                 guard, watchdog, say, faults: Faults = NO_FAULTS):
        self.accelerator, self.root, self.save_every, self.keep_last = accelerator, Path(run_root), save_every, keep_last
        self.global_batch, self.sharded = global_batch, sharded
        self.guard, self.watchdog, self.say, self.faults = guard, watchdog, say, faults

    def maybe_save(self, progress: Progress, epoch_ended: bool = False) -> None:
        """After a step (`epoch_ended`: after the last step of an epoch), if the cadence says so."""
        due = self.save_every == "epoch" if epoch_ended else (
            isinstance(self.save_every, int) and progress.step % self.save_every == 0)
        if due:
            self.save(progress)

    def save(self, progress: Progress) -> Path:
        self.guard.check()
        progress.world_size, progress.global_batch = self.accelerator.num_processes, self.global_batch
        progress.sharding = self.sharded
        tic = time.perf_counter()
        self.watchdog.beat()
        path = save_checkpoint(self.accelerator, self.root, progress, self.keep_last, self.faults)
        self.watchdog.beat()
        self.say(f"checkpoint {path} written in {time.perf_counter() - tic:.2f} s")
        return path
