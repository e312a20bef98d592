"""Resuming: a complete checkpoint loaded into this launch, whatever parallelism and world size wrote it.

    resume_mode (harness.distributed)   same world size | resharded from N to M | converted from X to Y | refused
    load_checkpoint                     every rank loads, or every rank refuses in one line
    restore_rng                         the RNG policy, said in one line at resume

A resharded checkpoint loads through Accelerate (DDP's state is whole; FSDP2's torch.distributed.checkpoint
folders shard onto the new mesh). A converted one goes through the consolidated training state, one form of
a checkpoint's model, optimizer and schedule that every parallelism can be given:

    State.model      {parameter name: whole fp32 tensor}
    State.optimizer  {"state": {parameter name: {"step", "exp_avg", "exp_avg_sq"}},
                      "param_groups": [{hyperparameters..., "params": [parameter names]}]}
    State.scheduler  the LR scheduler's state_dict

`read_state` builds it from Accelerate's files for DDP (model.safetensors, optimizer.bin) or from FSDP2's
folders, read whole on each rank without a process group; `apply_state` gives it to the launch's model and
optimizer through torch's state-dict API with whole tensors, which shards them where the launch shards.
Parameter names are the model's own (no wrapper prefixes), so both sides agree whatever wraps the model. Every
file read is a safetensors file, a weights-only torch load or DCP data whose metadata harness.safeload checked.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from harness.checkpoint import Progress, replace_dir, verify, write_manifest
from harness.distributed import failing_rank, resume_family
from harness.errors import BadInput, first_line
from harness.safeload import check_pickles

WHOLE = {"model": "model.safetensors", "optimizer": "optimizer.bin"}  # Accelerate's names for the first model/optimizer
DCP = {"model": "pytorch_model_fsdp_0", "optimizer": "optimizer_0"}
SCHEDULER = "scheduler.bin"
DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's own checkpoint
UNIVERSAL_WORDS = "through DeepSpeed's universal checkpoint"  # distributed.resume_mode's words for that path


@dataclass
class State:
    model: dict
    optimizer: dict
    scheduler: dict


def read_state(checkpoint: Path, family: str, groups: list[list[str]]) -> State:
    """The consolidated state of `checkpoint`, written under `family` (`DDP` or `FSDP2`). `groups` names the
    parameters of each of this run's optimizer groups in order: harness builds the same groups for the same
    config, which is how a DDP optimizer's numbered entries get their names."""
    try:
        if family == "FSDP2":
            model = _read_dcp(checkpoint / DCP["model"])["model"]
            optimizer = _read_dcp(checkpoint / DCP["optimizer"])["optimizer"]
        else:
            model = load_file(checkpoint / WHOLE["model"])
            optimizer = _named(torch.load(checkpoint / WHOLE["optimizer"], weights_only=True), groups)
        scheduler = torch.load(checkpoint / SCHEDULER, weights_only=True)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"checkpoint {checkpoint} cannot be read as {family} state: {first_line(e)}") from None
    model = {name.removeprefix("module."): t.float() if t.is_floating_point() else t for name, t in model.items()}
    return State(model, optimizer, scheduler)


def _read_dcp(folder: Path) -> dict:
    """A whole torch.distributed.checkpoint folder as nested dicts of whole tensors, in this process alone."""
    state: dict = {}  # as torch's own dcp_to_torch_save reads one: the planner fills the empty dict from the metadata
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": as intended
        warnings.simplefilter("ignore", UserWarning)
        _load_state_dict(state, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return state


def _named(saved: dict, groups: list[list[str]]) -> dict:
    """A torch optimizer state_dict (entries numbered across groups) keyed by parameter name instead."""
    if "master_weights" in saved:
        raise BadInput("the checkpoint holds fp32 master weights (train.bf16_mode=master_weights), which harness "
                       "does not convert to another parallelism: resume it under DDP or one process")
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g) for g in groups]:
        raise BadInput(f"the checkpoint's optimizer has parameter groups of {sizes} parameters, this run's "
                       f"{[len(g) for g in groups]}: it was written for another model or train.layer_lr_decay")
    state, param_groups = {}, []
    for group, names in zip(saved["param_groups"], groups):
        for index, name in zip(group["params"], names):
            if index in saved["state"]:
                state[name] = saved["state"][index]
        param_groups.append({**group, "params": list(names)})
    return {"state": state, "param_groups": param_groups}


def group_names(model, optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group, in order (`model` unwrapped)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def apply_state(state: State, model, optimizer, scheduler) -> None:
    """Every rank: the model's and optimizer's state from whole tensors (sharded here if the launch shards),
    the scheduler's as saved. `model` and `optimizer` as prepared (wrapped); collective under FSDP2."""
    options = StateDictOptions(full_state_dict=True, strict=True)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    set_model_state_dict(model, state.model, options=options)
    set_optimizer_state_dict(model, inner, state.optimizer, options=options)
    scheduler.load_state_dict(state.scheduler)


def load_checkpoint(accelerator, checkpoint: Path, model, optimizer, scheduler, saved: Progress, mode: str,
                    seed: int) -> str:
    """Every rank loads its state (model, optimizer, scheduler, RNG) from a complete checkpoint, or every rank
    refuses it: a file that would run code when unpickled, the RNG state of a rank that wrote it missing or
    unreadable (the resume would not be exact), or any load that fails, on any rank. `mode` is
    distributed.resume_mode's answer: a converted checkpoint loads through the consolidated state
    (harness.convert), any other through Accelerate (FSDP2's shards onto the new mesh by
    torch.distributed.checkpoint). Returns the RNG policy in one line."""
    agree_on_load(accelerator, loadable(checkpoint, accelerator.process_index, saved.world_size), checkpoint)
    error = None
    try:
        if mode.endswith(UNIVERSAL_WORDS):
            load_universal(universal_copy(accelerator, checkpoint), model, optimizer, scheduler,
                           torch.load(checkpoint / SCHEDULER, weights_only=True))
        elif mode.startswith("converted"):
            family = resume_family(saved.sharding)
            unwrapped = accelerator.unwrap_model(model)
            state = read_state(checkpoint, family, group_names(unwrapped, getattr(optimizer, "optimizer", optimizer)))
            apply_state(state, model, optimizer, scheduler)
        else:
            accelerator.load_state(str(checkpoint))
    except BaseException as e:  # a file that does not parse; FSDP2's checkpointing raises a BaseException of its own
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = e if isinstance(e, BadInput) else BadInput(f"checkpoint {checkpoint} cannot be loaded: {first_line(e)}")
    agree_on_load(accelerator, error, checkpoint)
    for group in optimizer.param_groups:  # a train.cuda_graphs run saved it as a tensor (StepGraphs makes it one again)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
    return restore_rng(checkpoint, accelerator.process_index, accelerator.num_processes, saved, seed)


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
