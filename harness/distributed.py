"""Building the Accelerator for whatever `accelerate launch` asked for: CPU (gloo), DDP, DeepSpeed.

The launch config alone decides the hardware; the code path is the same everywhere.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

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


class StopFlag:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit) ask for a clean stop.

    The handler only records the request; `should_stop` is a collective (a max all-reduce) that every rank
    calls at each optimizer-step boundary, so a signal that reached one rank stops all of them at the same
    step, and none waits forever in a collective the others skipped. A second signal changes nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def should_stop(self, accelerator) -> bool:
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item() > 0)
