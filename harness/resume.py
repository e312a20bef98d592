"""Resuming: a complete checkpoint loaded into this launch, whatever parallelism and world size wrote it.

    resume = Resume(accelerator, checkpoint, saved, seed)   says what it will do (distributed.resume_mode)
    resume.before_prepare(model, optimizer)                 checks every file; a conversion's weights go in here
    model, optimizer, ... = accelerator.prepare(...)
    rng_line = resume.after_prepare(model, optimizer, scheduler)

Four ways, by what wrote the checkpoint and what resumes it:
- the same layout and world size: Accelerate's load_state, as written;
- DDP or FSDP2 on another world size: Accelerate's load_state too (DDP's state is whole; FSDP2's
  torch.distributed.checkpoint folders shard onto the new mesh);
- DeepSpeed ZeRO on another world size: DeepSpeed's universal layout of the checkpoint, converted once beside
  it (`universal_copy`), loaded by DeepSpeed's universal loader (`load_universal`);
- another parallelism: the consolidated training state (harness.consolidate), read from the checkpoint (from
  its universal copy for ZeRO) and given to the new one.
Every rank loads, or every rank refuses in one line (agree_on_load). The RNG policy is `restore_rng`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed

from harness.checkpoint import Progress, replace_dir, verify, write_manifest
from harness.consolidate import DEEPSPEED_TAG, SCHEDULER, load_optimizer, load_weights, read_state
from harness.distributed import UNIVERSAL, failing_rank, resume_family, resume_mode, sharding
from harness.errors import BadInput, first_line
from harness.safeload import check_pickles


class Resume:
    """A checkpoint being loaded into this launch, in two phases around `accelerator.prepare`."""

    def __init__(self, accelerator, checkpoint: Path, saved: Progress, seed: int, master_weights: bool):
        self.accelerator, self.checkpoint, self.saved, self.seed = accelerator, checkpoint, saved, seed
        self.mode = resume_mode(saved.world_size, saved.sharding, accelerator.num_processes, sharding(accelerator))
        self.converted = self.mode.startswith("converted")
        self.zero = resume_family(sharding(accelerator)).startswith("ZeRO")
        self.state = None
        if self.converted and master_weights:
            raise BadInput(f"checkpoint {checkpoint}: harness does not convert a checkpoint into fp32 master weights "
                           f"(train.bf16_mode=master_weights); resume it with train.bf16_mode=autocast")

    def before_prepare(self, model, optimizer) -> None:
        """Collective. Every file of the checkpoint is checked on every rank; a conversion reads the consolidated
        state and puts its weights into the bare model, which `prepare` then shards or copies as it always does."""
        acc, checkpoint = self.accelerator, self.checkpoint
        agree_on_load(acc, loadable(checkpoint, acc.process_index, self.saved.world_size), checkpoint)
        if not self.converted:
            return
        family = resume_family(self.saved.sharding)
        universal = universal_copy(acc, checkpoint) if family.startswith("ZeRO") else None
        error = None
        try:
            shapes = None if self.zero else {n: p.shape for n, p in model.named_parameters()}
            self.state = read_state(checkpoint, family, model, optimizer, universal, shapes)
            if not self.zero:  # ZeRO-3 built its model partitioned: ZeRO's weights go in after `prepare`
                load_weights(self.state, model)
        except BadInput as e:
            error = e
        agree_on_load(acc, error, checkpoint)

    def after_prepare(self, model, optimizer, scheduler) -> str:
        """Collective: the optimizer, the schedule and the RNG streams; returns the RNG policy in one line."""
        acc, checkpoint = self.accelerator, self.checkpoint
        error = None
        try:
            if self.converted:
                load_optimizer(self.state, model, optimizer, scheduler, self.zero)
            elif self.mode.endswith(UNIVERSAL):
                load_universal(universal_copy(acc, checkpoint), model, optimizer, scheduler,
                               torch.load(checkpoint / SCHEDULER, weights_only=True))
            else:
                acc.load_state(str(checkpoint))
        except BaseException as e:  # a file that does not parse; FSDP2's checkpointing raises a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = e if isinstance(e, BadInput) else BadInput(f"checkpoint {checkpoint} cannot be loaded: {first_line(e)}")
        agree_on_load(acc, error, checkpoint)
        self.state = None
        for group in optimizer.param_groups:  # a train.cuda_graphs run saved it as a tensor (StepGraphs makes it one)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])
        return restore_rng(checkpoint, acc.process_index, acc.num_processes, self.saved, self.seed)


def universal_copy(accelerator, checkpoint: Path) -> Path:
    """DeepSpeed's universal layout of a ZeRO checkpoint (each parameter's fp32 weights and Adam moments whole),
    which loads on any world size: converted by the main process beside the checkpoint, never in it, as
    checkpoints/universal-step-N/ (written under a .tmp name, its manifest written last and verified, then
    renamed), and reused by the next resume. Collective: every rank gets the path or BadInput."""
    from deepspeed.checkpoint import ds_to_universal  # DeepSpeed is optional: only a ZeRO run gets here

    target = checkpoint.parent / f"universal-{checkpoint.name}"
    error = None
    if accelerator.is_main_process and verify(target) is not None:
        tmp = target.with_name(target.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's progress lines; its errors still raise
                ds_to_universal.main(argparse.Namespace(
                    input_folder=str(checkpoint / DEEPSPEED_TAG), output_folder=str(tmp / DEEPSPEED_TAG),
                    num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                    inject_missing_state=True))  # one worker: in this process (no pool forked from a rank)
            write_manifest(tmp, {"converted_from": checkpoint.name})
            reason = verify(tmp)
            if reason:
                raise OSError(f"the converted copy does not verify: {reason}")
            replace_dir(tmp, target)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = BadInput(f"checkpoint {checkpoint}: DeepSpeed's universal conversion failed: {first_line(e)}")
    agree_on_load(accelerator, error, checkpoint)
    check_pickles(target, "converted checkpoint")  # a reused copy is a file like any other: checked before it loads
    return target


def load_universal(universal: Path, engine, optimizer, scheduler, schedule: dict) -> None:
    """The DeepSpeed engine's model and ZeRO optimizer state from a universal copy, partitioned for this world size
    (DeepSpeed reads the layout when its config says so: set for this load only), then the schedule. DeepSpeed
    gives every parameter group the first group's hyperparameters from the copy (under ZeRO-3 at least), which
    would put weight decay on biases and LayerNorm: each group gets its own back, as this run built it from the
    config, with its learning rate where the schedule stands, and its own step count."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(universal), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise BadInput(f"{universal}: DeepSpeed found no checkpoint to load there")
    scheduler.load_state_dict(schedule)
    for group, own, lr in zip(optimizer.param_groups, groups, scheduler.get_last_lr()):
        group.update({**own, "lr": lr})
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's
    for state in base.state.values():  # ZeRO-3's load gives every group one step tensor: each update would add to it
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def restore_rng(checkpoint: Path, rank: int, world_size: int, saved: Progress, seed: int) -> str:
    """The RNG policy of a resume: a rank that wrote the checkpoint continues its own saved streams (Python,
    NumPy, torch, CUDA), exactly as if uninterrupted; a rank beyond the world that wrote it seeds all of them
    from (train.seed, its rank, the step), the same on every resume of that checkpoint. The states of ranks that
    are gone are not used. Data order never depends on these streams (the sampler is seeded by epoch)."""
    if rank < saved.world_size:
        states = accelerate_load(checkpoint / f"random_states_{rank}.pkl")
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    else:
        derived = int(np.random.SeedSequence([seed, rank, saved.step]).generate_state(1)[0])
        set_seed(derived)
    kept = min(world_size, saved.world_size)
    line = f"RNG: {_ranks(0, kept - 1)} continue{'s' if kept == 1 else ''} the saved streams"
    if world_size > saved.world_size:
        new = world_size - saved.world_size
        line += (f"; new {_ranks(saved.world_size, world_size - 1)} start{'s' if new == 1 else ''} from streams "
                 f"seeded by train.seed, the rank and step {saved.step}")
    elif world_size < saved.world_size:
        line += f"; the streams of {_ranks(world_size, saved.world_size - 1)} (gone) are not used"
    return line


def _ranks(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


def loadable(checkpoint: Path, rank: int, saved_world_size: int) -> Optional[BadInput]:
    """Why this rank cannot load `checkpoint` exactly, or None. A rank beyond the world that wrote it (DDP resumed on
    more processes) has no RNG state of its own there and starts from Accelerate's."""
    try:
        check_pickles(checkpoint, "checkpoint")
    except BadInput as e:
        return e
    rng = checkpoint / f"random_states_{rank}.pkl"
    if rank >= saved_world_size:
        return None
    try:
        accelerate_load(rng)
    except Exception as e:
        return BadInput(f"checkpoint {checkpoint}: {rng.name} cannot be read ({first_line(e)}); without it the "
                        f"resume would not be exact: resume from another checkpoint (train.resume=PATH)")
    return None


def agree_on_load(accelerator, error: Optional[BadInput], checkpoint: Path) -> None:
    """Collective: if loading failed on any rank, every rank raises BadInput (that rank with its own reason), so
    that all of them exit together instead of some waiting for the others."""
    rank = failing_rank(accelerator, error is not None)
    if rank >= 0:
        raise error or BadInput(f"checkpoint {checkpoint} cannot be loaded on rank {rank} (its own line says why)")
