"""Checkpoints and exported models: atomic writes, and finding the newest complete checkpoint.

    OUTPUT_DIR/checkpoints/step-00000120/       resumable state: Accelerate's save_state (model, optimizer,
                                                scheduler, every rank's RNG) + progress.json + COMPLETE.json
    OUTPUT_DIR/best/, OUTPUT_DIR/final/         Hugging Face-format models (harness.run_folder owns the layout)

Every folder is written under a `.tmp` name and renamed into place once whole; a checkpoint's
COMPLETE.json (written last) lists each file's size. A checkpoint without it, or whose files do not match
it, is never loaded: a `kill -9` at any moment leaves the previous complete checkpoint usable.

A write that fails (a full disk, a quota, an I/O error) on any rank stops every rank: the ranks agree on it
by an all-reduce after each phase of the write, the partial `.tmp` folder is removed, older checkpoints
are untouched (pruning runs only after a newer one is complete), and WriteFailed names the path and error.
Fault injection for tests: HARNESS_FAULT_WRITE=POINT[@STEP] (POINT: mkdir, state, progress, complete,
rename, model) raises ENOSPC there on rank HARNESS_FAULT_WRITE_RANK (default 0).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from harness.errors import BadInput, WriteFailed, first_line

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
    sharding: Optional[str] = None  # DeepSpeed ZeRO / FSDP state is per rank: resume on world_size processes only


# ---------------------------------------------------------------- finding checkpoints


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint at `path` is complete and its files are whole, else the reason it is not."""
    marker = path / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (unfinished write)"
    try:
        manifest = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE} is corrupt"
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


def latest_checkpoint(out: Path, warn: Callable[[str], None] = print) -> Optional[Path]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    for p in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        reason = "unfinished write" if p.name.endswith(".tmp") else verify(p)
        if reason is None:
            return p
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
    try:
        return Progress(**json.loads((path / PROGRESS).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise BadInput(f"checkpoint {path}: cannot read {PROGRESS}: {e}") from None


# ---------------------------------------------------------------- writing


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


def _fault(point: str, rank: int, step: Optional[int] = None) -> None:
    wanted = os.environ.get("HARNESS_FAULT_WRITE")
    if not wanted or rank != int(os.environ.get("HARNESS_FAULT_WRITE_RANK", "0")):
        return
    name, _, at = wanted.partition("@")
    if name == point and (not at or int(at) == step):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at '{point}')")


def _dcp_error() -> type:
    """Distributed checkpointing (FSDP2) gathers the ranks' write errors into one exception, a BaseException
    (imported here, not at the top: torch.distributed.checkpoint takes most of a second to import)."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover
        return Exception
    return CheckpointException


def _agree(accelerator, error: Optional[BaseException], path: Path, cleanup=None, keep: Optional[Path] = None) -> None:
    """Collective, after each phase of a write: if it failed on any rank, every rank raises WriteFailed
    (the rank it failed on with its own error), after the main process ran `cleanup`."""
    failed_rank = accelerator.process_index if error is not None else -1
    if accelerator.num_processes > 1:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([failed_rank], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed_rank = int(flag.item())
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


def save_checkpoint(accelerator, out: Path, progress: Progress, keep_last: int) -> Path:
    """Resumable state for `progress.step`. Every rank must call it (DeepSpeed's save is collective)."""
    final = checkpoint_dir(out, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    rank, step = accelerator.process_index, progress.step
    previous = latest_checkpoint(out, warn=lambda message: None)
    remove_tmp = functools.partial(shutil.rmtree, tmp, ignore_errors=True)
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _fault("mkdir", rank, step)
        except Exception as e:
            error = e
    _agree(accelerator, error, final, remove_tmp, previous)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        _fault("state", rank, step)
    except (Exception, _dcp_error()) as e:  # a full disk shows as OSError, torch.save's RuntimeError, SafetensorError...
        error = e
    _agree(accelerator, error, final, remove_tmp, previous)
    if accelerator.is_main_process:
        try:
            with open(tmp / PROGRESS, "w") as f:  # a write cut short leaves a partial file, as a full disk does
                _fault("progress", rank, step)
                f.write(json.dumps(asdict(progress), indent=2))
                f.flush()
                os.fsync(f.fileno())
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            for rel in files:
                with open(tmp / rel, "rb") as fh:
                    os.fsync(fh.fileno())
            _fault("complete", rank, step)
            _fsync_write(tmp / COMPLETE, json.dumps({"step": progress.step, "files": files}, indent=2))
            _fault("rename", rank, step)
            replace_dir(tmp, final)
            _fsync_dir(final.parent)
        except Exception as e:
            error = e
    _agree(accelerator, error, final, remove_tmp, previous)
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


TRAINING_CONFIG = "training_config.yaml"  # beside an exported model: how it was trained and its data prepared


def save_model(accelerator, model, tokenizer, path: Path, extra: Optional[dict] = None,
               training_config: Optional[str] = None, weights: Optional[Callable[[], Optional[dict]]] = None) -> None:
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
            _fault("model", accelerator.process_index)
            if extra is not None:
                (tmp / "eval_results.json").write_text(json.dumps(extra, indent=2) + "\n")
            if training_config is not None:
                (tmp / TRAINING_CONFIG).write_text(training_config)
            replace_dir(tmp, path)
        except Exception as e:
            error = e
    _agree(accelerator, error, path, functools.partial(shutil.rmtree, tmp, ignore_errors=True),
           latest_checkpoint(path.parent, warn=lambda message: None))


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
    _agree(accelerator, error, path, functools.partial(shutil.rmtree, tmp, ignore_errors=True),
           latest_checkpoint(path.parent, warn=lambda message: None))
