"""Precision: whether a bf16 launch keeps bf16 weights with fp32 masters, and the master weights themselves."""

from __future__ import annotations

import os

import torch
from torch import nn

from harness.distributed import deepspeed_requested, fsdp_requested
from harness.errors import BadInput


def bf16_master_weights(bf16_mode: str) -> bool:
    """Whether this run keeps bf16 weights with fp32 masters (train.bf16_mode=master_weights under a bf16
    launch config); refused, naming the reason, where the launch config's engine decides precision itself.
    `auto`: master weights on a GPU with one process or DDP (no autocast casts in every step), autocast on CPUs
    and wherever DeepSpeed or FSDP decide precision."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "bf16":
        return False
    if bf16_mode == "auto":
        on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() != "true"
        return on_gpu and not (deepspeed_requested() or fsdp_requested())
    if bf16_mode != "master_weights":
        return False
    if deepspeed_requested() or fsdp_requested():
        raise BadInput("train.bf16_mode=master_weights is for one process or DDP: with DeepSpeed or FSDP launch configs, "
                       "their own bf16 settings decide (DeepSpeed keeps fp32 master weights already)")
    return True


def precision_in_words(mixed_precision: str, master_weights: bool) -> str:
    """What the run computes in, for its start line and launches.jsonl."""
    return "bf16 weights, fp32 master weights" if master_weights else mixed_precision


class MasterWeights:
    """bf16 weights for the forward and backward, fp32 master weights and optimizer states for the update
    (`train.bf16_mode: master_weights`): no autocast, so none of its casts of weights and activations and
    their gradients in every step.

    `optimizer` was built on the model's fp32 parameters, on the training device (Accelerate's `prepare` moves
    the model, which no longer holds them): they become the master weights, and the model is given bf16 copies.
    Hooks on the optimizer do the rest, so the loop and Accelerate see a plain optimizer:
    before each step the bf16 gradients (already all-reduced by DDP, and clipped) are copied into fp32; after
    it the masters are copied back into the bf16 weights. The optimizer's state_dict carries the masters, so a
    checkpoint resumes exactly; `state_dict()` gives the fp32 weights for exports.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        twins: dict[int, nn.Parameter] = {}
        self.masters: list[nn.Parameter] = []
        for module in model.modules():
            for name, master in list(module.named_parameters(recurse=False)):
                if id(master) not in twins:  # a tied weight gets one copy, shared as the original was
                    twins[id(master)] = nn.Parameter(master.detach().to(torch.bfloat16), requires_grad=master.requires_grad)
                    self.masters.append(master)
                setattr(module, name, twins[id(master)])
        self.params = [twins[id(m)] for m in self.masters]
        self.grads = [torch.empty_like(m) for m in self.masters]  # fp32 gradients, kept between steps
        optimizer.register_step_pre_hook(self._grads_to_masters)
        optimizer.register_step_post_hook(self._masters_to_weights)
        optimizer.register_state_dict_post_hook(self._with_masters)
        optimizer.register_load_state_dict_pre_hook(self._load_masters)
        optimizer.register_load_state_dict_post_hook(self._masters_to_weights)

    def _grads_to_masters(self, *_) -> None:
        pairs = [(m, g, p) for m, g, p in zip(self.masters, self.grads, self.params) if p.grad is not None]
        for master, grad, _ in pairs:
            master.grad = grad
        torch._foreach_copy_([g for _, g, _ in pairs], [p.grad for _, _, p in pairs])
        for _, _, p in pairs:
            p.grad = None  # the next micro-batches accumulate from zero

    @torch.no_grad()
    def _masters_to_weights(self, *_) -> None:
        torch._foreach_copy_(self.params, self.masters)

    def _with_masters(self, _, state_dict: dict) -> dict:
        state_dict["master_weights"] = [m.detach() for m in self.masters]
        return state_dict

    @torch.no_grad()
    def _load_masters(self, _, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is None or len(saved) != len(self.masters):
            raise ValueError("the checkpoint's optimizer state holds no fp32 master weights for this model "
                             "(written with another train.bf16_mode?)")
        for master, value in zip(self.masters, saved):
            master.copy_(value)
        return state_dict

    def state_dict(self, model: nn.Module) -> dict:
        """`model`'s state_dict with its (bf16) parameters replaced by their fp32 masters: what is exported."""
        fp32 = {id(p): m.detach() for p, m in zip(self.params, self.masters)}
        named = dict(model.named_parameters(remove_duplicate=False))
        return {k: fp32[id(named[k])] if k in named else v for k, v in model.state_dict().items()}
