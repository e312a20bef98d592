"""Building the Accelerator for whatever `accelerate launch` asked for: CPU (gloo), DDP, DeepSpeed.

The launch config alone decides the hardware; the code path is the same everywhere.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this in every process it starts."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(grad_accum_steps: int = 1) -> Accelerator:
    kwargs: dict = {}
    if not torch.cuda.is_available():
        if deepspeed_requested():
            # cpu=True would drop the DeepSpeed plugin; without an explicit backend Accelerate records one
            # process while DeepSpeed sees the whole world (see ENVIRONMENT.md).
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            # A MULTI_GPU launch config on a machine without GPUs still starts N ranks; cpu=True makes them gloo.
            kwargs["cpu"] = True
    return Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        # The schedule is sized in optimizer steps and stepped once per step, never once per process.
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
