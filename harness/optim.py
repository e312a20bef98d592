"""AdamW with the usual parameter groups and layer-wise learning-rate decay, and the warmup-and-decay schedules."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# a parameter of the repeated stack: BERT's encoder.layer.N, Llama's layers.N, GPT-2's h.N, T5's block.N
LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def depths(names: list[str]) -> tuple[dict[str, int], int]:
    """Each parameter's depth for layer-wise decay, and the top depth: 0 for the embeddings, N + 1 for layer N of the
    repeated stack, the top (number of layers + 1) for everything after it (pooler, final norm, classifier)."""
    layers = [int(m.group(1)) for n in names if (m := LAYER.search(n))]
    top = max(layers, default=-1) + 2
    found = {}
    for name in names:
        match = LAYER.search(name)
        found[name] = int(match.group(1)) + 1 if match else (0 if "embed" in name else top)
    return found, top


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False,
                    layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and normalization weights; `fused`: one kernel per step (CUDA and CPU).
    `layer_decay` (train.layer_lr_decay) below 1 gives each depth `lr x layer_decay ** (top - depth)`: the
    classifier the full rate, each layer below it a fraction, the embeddings the least (Howard & Ruder, 2018)."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth, top = depths([n for n, _ in named]) if layer_decay != 1.0 else ({n: 0 for n, _ in named}, 0)
    groups: dict[tuple[int, bool], list] = {}
    for name, p in named:
        decays = not (name.endswith("bias") or id(p) in no_decay)
        groups.setdefault((depth[name], decays), []).append(p)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * layer_decay ** (top - d)}
         for (d, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))],
        lr=lr, fused=fused or None)


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                shape: str = "linear") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's peak lr, then decay to 0 at `total_steps` (counted in optimizer steps):
    linear (transformers' get_linear_schedule_with_warmup) or half a cosine (its get_cosine_schedule_with_warmup).

    The caller steps it once per optimizer step on every rank (never once per process per step, Accelerate's
    default when prepared). The factor is a closure, which the scheduler's state_dict leaves out: a resumed run
    keeps the step count and takes the schedule it computed for its own world size.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * done)) if shape == "cosine" else 1.0 - done

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
