"""Guards that end a run cleanly without waiting for the GPU in a step: stop signals, stalls and non-finite losses."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from harness.errors import EXIT_STALLED, TrainingDiverged
from harness.faults import NONE as NO_FAULTS, Faults


class StopFlag:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit) ask for a clean stop.

    The handler only records the request. `should_stop` is called by every rank at every optimizer-step
    boundary. With several processes it is a collective that never waits for the GPU: a MAX all-reduce of
    a CPU flag over a gloo group, started at one step and read at the next, so a signal that reached one
    rank stops all of them at the same step (one step after it arrived), and none waits forever in a
    collective the others skipped. A second signal changes nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        self._group = None
        self._pending = None  # (work, tensor) of the all-reduce started at the previous step

    def install(self, accelerator=None, timeout: Optional[timedelta] = None) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if accelerator is not None and accelerator.num_processes > 1:
            # every rank creates it (a collective); gloo keeps the flag on the CPU, away from CUDA streams
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        return self

    def uninstall(self) -> None:
        if self._pending is not None:  # every rank started it: finish it so that no rank leaves one behind
            self._pending[0].wait()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def should_stop(self) -> bool:
        local = self.received is not None
        if self._group is None:
            return local
        decided = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = bool(flag.item() > 0)  # a CPU tensor: no device synchronisation
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return decided


class StallWatchdog:
    """`train.stall_timeout_s`: a thread on every rank that ends a rank which stopped making progress.

    `beat()` marks progress: every optimizer step, every evaluation batch, and each rank's entry to and exit
    from a checkpoint or model write. When no beat came for the bound, the rank prints one line and the Python
    stacks of all its threads (faulthandler) to stderr, records the reason in the run folder and exits with
    EXIT_STALLED, so the launcher ends the job (a peer waiting in a collective trips its own watchdog the same way).
    The clock starts at the first step, after loading and `prepare`; until the first step is done the bound is
    tripled (a compiled model's first step compiles; cuDNN plans are built). Evaluations and checkpoint writes
    beat as they go, so only one evaluation batch or one write longer than the bound counts as a stall.
    """

    FIRST_STEP_FACTOR = 3

    def __init__(self, timeout_s: Optional[float], rank: int, on_stall: Optional[Callable[[str], None]] = None,
                 faults: Faults = NO_FAULTS):
        self.timeout_s, self.rank, self.on_stall, self.faults = timeout_s, rank, on_stall, faults
        self.step, self.stepped = 0, False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "StallWatchdog":
        if self.timeout_s:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="harness-stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: Optional[int] = None) -> None:
        self._last = time.monotonic()
        if step is not None:
            self.step, self.stepped = step, True
            if self.faults.stalls(self.rank, step):
                print(f"harness: fault injection: rank {self.rank} stalls after step {step}", file=sys.stderr, flush=True)
                time.sleep(3600)

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(5.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s * (1 if self.stepped else self.FIRST_STEP_FACTOR):
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        reason = (f"rank {self.rank} made no training progress for {idle:.0f} s (train.stall_timeout_s="
                  f"{self.timeout_s:g}; last completed step {self.step}); stopped by the stall watchdog")
        try:
            with tempfile.TemporaryFile("w+") as f:  # faulthandler writes to a file descriptor, unbuffered
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                stacks = "".join(f"[rank {self.rank}] {line}" for line in f)  # ranks share stderr: label each line
            sys.stderr.write(f"harness: error: {reason}; the stacks of its threads follow\n{stacks}")
            sys.stderr.flush()
            if self.on_stall is not None:
                self.on_stall(reason)
        finally:
            os._exit(EXIT_STALLED)


class NonFiniteGuard:
    """Stops a run whose loss or gradient norm became NaN or infinite, before anything is saved from it.

    Every micro-batch adds to a device-side record of the first bad step (no host synchronisation); the
    record is all-reduced (MIN over ranks) and read only where the run acts: log steps, evaluations and
    every save. A bad value on any rank then stops every rank at the same step with TrainingDiverged.
    `newest_good()` names the checkpoint to resume from in that error.
    """

    NONE = 2**62

    def __init__(self, accelerator, newest_good: Callable[[], object], faults: Faults = NO_FAULTS):
        self.accelerator, self.newest_good, self.faults = accelerator, newest_good, faults
        self.first_bad = torch.full((), self.NONE, dtype=torch.long, device=accelerator.device)

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss as computed, or NaN where a test asked for a non-finite step."""
        if self.faults.poisons(self.accelerator.process_index, step):
            return loss * float("nan")
        return loss

    def observe(self, step: int, loss: torch.Tensor, grad_norm=None) -> None:
        bad = ~torch.isfinite(loss.detach().float())
        if isinstance(grad_norm, torch.Tensor):
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor (every rank calls this)
                grad_norm = grad_norm.full_tensor()
            bad = bad | ~torch.isfinite(grad_norm.detach().float().to(bad.device))
        self.first_bad = torch.where(bad, torch.minimum(self.first_bad, torch.full_like(self.first_bad, step)), self.first_bad)

    def check(self) -> None:
        """Collective: every rank calls it at the same points. Raises on every rank if any rank saw a bad value."""
        first = self.first_bad.clone()
        if self.accelerator.num_processes > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        if first != self.NONE:
            checkpoint = self.newest_good() or "none (start again)"
            raise TrainingDiverged(
                f"the loss or gradient norm became non-finite at step {first}; nothing was saved after it. "
                f"Newest good checkpoint: {checkpoint}; resume from it with a lower train.lr "
                f"(train.resume=PATH), or check the data of that step"
            )
