"""The consolidated training state: one form of a checkpoint's model, optimizer and schedule that every
parallelism can be given, so that a run written under one (DDP, FSDP2, DeepSpeed ZeRO) resumes under another.

    State.model      {parameter name: whole fp32 tensor}
    State.optimizer  {"state": {parameter name: {"step", "exp_avg", "exp_avg_sq"}},
                      "param_groups": [{hyperparameters..., "params": [parameter names]}]}
    State.scheduler  the LR scheduler's state_dict

`read_state` builds it from Accelerate's files for DDP or one process (model.safetensors, optimizer.bin), from
FSDP2's torch.distributed.checkpoint folders, or from DeepSpeed's universal layout of a ZeRO checkpoint (each
parameter's fp32 weights and moments whole), each read whole in this process. The weights go into the bare
model before `accelerator.prepare` (`load_weights`), so that DDP, FSDP2 and ZeRO each shard or copy them as
they always do; the optimizer's state goes in after it (`load_optimizer`): torch's state-dict API with whole
tensors for DDP and FSDP2, DeepSpeed's per-parameter setters for ZeRO. Parameter names are the model's own (no
wrapper prefixes), so every side agrees whatever wraps the model. Every file read is a safetensors file, a
weights-only torch load, or DCP data whose metadata harness.safeload checked.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from harness.errors import BadInput, first_line

WHOLE = {"model": "model.safetensors", "optimizer": "optimizer.bin"}  # Accelerate's names for the first model/optimizer
DCP = {"model": "pytorch_model_fsdp_0", "optimizer": "optimizer_0"}
SCHEDULER = "scheduler.bin"
DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's own checkpoint
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class State:
    model: dict
    optimizer: dict
    scheduler: dict


def group_names(model, optimizer) -> list[list[str]]:
    """The parameter names of each optimizer group, in order (`model` unwrapped)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def read_state(checkpoint: Path, family: str, model, optimizer, universal: Path | None = None,
               shapes: dict | None = None) -> State:
    """The consolidated state of `checkpoint`, written under `family` (`DDP`, `FSDP2`, or a ZeRO family with its
    `universal` copy). `model` and `optimizer` are this run's, bare: harness builds the same parameter groups
    for the same config, which is how a DDP optimizer's numbered entries and ZeRO's flat groups get names.
    `shapes` (each parameter's) gives ZeRO-3's flat tensors their shape, where the new launch needs it."""
    groups = group_names(model, optimizer)
    try:
        scheduler = torch.load(checkpoint / SCHEDULER, weights_only=True)
        if family == "FSDP2":
            weights = _read_dcp(checkpoint / DCP["model"])["model"]
            moments = _read_dcp(checkpoint / DCP["optimizer"])["optimizer"]
        elif family == "DDP":
            weights = load_file(checkpoint / WHOLE["model"])
            moments = _named(torch.load(checkpoint / WHOLE["optimizer"], weights_only=True), groups)
        else:
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            weights, moments = _read_universal(universal / DEEPSPEED_TAG / "zero", groups, hyper, scheduler, shapes)
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"checkpoint {checkpoint} cannot be read as {family} state: {first_line(e)}") from None
    weights = {name.removeprefix("module."): t.float() if t.is_floating_point() else t for name, t in weights.items()}
    return State(weights, moments, scheduler)


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


def _read_universal(zero: Path, groups: list[list[str]], hyper: list[dict], scheduler: dict,
                    shapes: dict | None) -> tuple[dict, dict]:
    """Weights and moments from DeepSpeed's universal layout (zero/NAME/{fp32,exp_avg,exp_avg_sq}.pt; the step in
    step.pt or, under ZeRO-3, in zero/optimizer_state.pt). The groups' hyperparameters are this run's own, with
    the learning rates where the saved schedule stands."""
    def tensor(path: Path) -> torch.Tensor:
        value = torch.load(path, map_location="cpu", weights_only=True)
        value = value["param"] if isinstance(value, dict) else value
        shape = (shapes or {}).get(path.parent.name)
        return value.view(shape) if shape is not None and value.numel() == shape.numel() else value

    names = [n for g in groups for n in g]
    missing = [n for n in names if not (zero / n / "fp32.pt").is_file()]
    if missing:
        raise BadInput(f"the checkpoint holds no parameter {missing[0]!r} ({len(missing)} missing): it was written "
                       f"for another model")
    step_file = zero / names[0] / "step.pt"
    if step_file.is_file():
        step = float(torch.load(step_file, weights_only=True))
    else:  # weights only, with the two DeepSpeed data types this file holds (a loss scaler, the stage) allowed
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
            common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=True)
        step = float(common["optimizer_state_dict"]["state"][0]["step"])
    weights = {n: tensor(zero / n / "fp32.pt") for n in names}
    state = {n: {"step": torch.tensor(step), **{k: tensor(zero / n / f"{k}.pt") for k in MOMENTS}} for n in names}
    lrs = scheduler.get("_last_lr") or [h["lr"] for h in hyper]
    param_groups = [{**h, "lr": lr, "params": list(g)} for h, lr, g in zip(hyper, lrs, groups)]
    return weights, {"state": state, "param_groups": param_groups}


def load_weights(state: State, model) -> None:
    """The bare model's parameters (before `prepare`); buffers that the model builds itself stay as they are."""
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(state.model))
    if missing:
        raise BadInput(f"the checkpoint holds no parameter {missing[0]!r} ({len(missing)} missing): it was written "
                       f"for another model")
    with torch.no_grad():
        for name, param in own.items():
            if param.shape != state.model[name].shape:
                raise BadInput(f"the checkpoint's {name} has shape {tuple(state.model[name].shape)}, this model's "
                               f"{tuple(param.shape)}: it was written for another model")
            param.copy_(state.model[name])


def load_optimizer(state: State, model, optimizer, scheduler, zero: bool) -> None:
    """The prepared optimizer's moments and step counts (under ZeRO the weights too), then the schedule.
    Collective under FSDP2 and ZeRO."""
    if zero:
        _into_zero(state, model)
    else:
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
        set_optimizer_state_dict(model, inner, state.optimizer, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _into_zero(state: State, engine) -> None:
    """ZeRO's weights for the forward (partitioned under ZeRO-3, whose bare model was never whole), the fp32 copy
    the update works on, and the moments: each parameter gathered whole (ZeRO-3; a no-op otherwise) and set, and
    DeepSpeed's setters given whole tensors, keeping this rank's part. The step count goes into each flat group's
    own state (one tensor each: a shared one would be advanced by every group's update)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # optional: ZeRO runs only
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer of ZeRO's flat groups
    # Adam's state is made at its first step: made here, to be filled. ZeRO-3 hands its flat groups to the torch
    # optimizer only inside a step, so they are found on ZeRO's own optimizer.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        p for group in base.param_groups for p in group["params"]]
    for flat in flats:
        if not base.state.get(flat):
            base.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2 links it after a step
    if link is not None:
        link()
    params = dict(engine.module.named_parameters())
    with GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, param in params.items():
            param.copy_(state.model[name].reshape(param.shape))
    steps = set()
    for name, param in params.items():
        saved = state.optimizer["state"][name]
        steps.add(float(saved["step"]))
        safe_set_full_fp32_param(param, state.model[name].float())
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, saved[key].float(), key)
    for flat in base.state.values():
        flat["step"] = torch.tensor(max(steps)) if isinstance(flat.get("step"), torch.Tensor) else int(max(steps))
