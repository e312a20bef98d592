"""What a run reports while it trains: the metrics log, the throughput meter, the host-sync watch.

    meter = Throughput(accelerator, flops_per_token(model), peak_flops(None))
    meter.count(batch)                  # every micro-batch, on the host, before the copy to the device
    record = meter.read(loss_sum)       # at a log step: one all-reduce, the only device sync of the step
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
import warnings

import torch


def trackers(report_to) -> list[str]:
    """`train.report_to` as Accelerate's `log_with` list; a tracker that is not installed is bad input."""
    import importlib.util

    from harness.config import TRACKERS
    from harness.errors import BadInput

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n != "none"]
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise BadInput(f"train.report_to={name}: the package '{TRACKERS[name]}' is not installed (pip install {name})")
    return names


class MetricsLog:
    """`metrics.jsonl` (always, main process only) plus Accelerate's trackers (`train.report_to`).

    A resumed run drops the records past its checkpoint (they will be redone): from metrics.jsonl here,
    and from TensorBoard through its `purge_step`. A fresh run's folder was emptied by RunFolder.begin.
    """

    def __init__(self, accelerator, run, cfg, resume_step: int | None):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = run.metrics
        if self.enabled and resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tracking = bool(accelerator.log_with)
        if self.tracking:
            flat = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
                    for section, values in cfg.to_dict().items() for key, value in values.items()}
            purge = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
            accelerator.init_trackers(run.root.name or "harness", config=flat, init_kwargs=purge)

    def log(self, step: int, values: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tracking:  # Accelerate logs on the main process only
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.tracking = False  # the trackers themselves are finished by accelerator.end_training()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Throughput:
    """Samples, real tokens, padding, MFU and peak memory between two log steps, summed over all ranks.

    Batches are counted on the host (before their copy to the device) and the loss is summed on the
    device, so nothing waits for the GPU until `read`, which does one all-reduce for everything.
    """

    def __init__(self, accelerator, model_flops, device_peak_flops: float | None):
        self.accelerator, self.model_flops, self.device_peak = accelerator, model_flops, device_peak_flops
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum.zero_()
        self.micro_batches = self.samples = self.real_tokens = self.padded_tokens = 0
        self.tic = time.perf_counter()

    def count(self, batch: dict) -> None:
        self.samples += batch["labels"].numel()
        real = int(batch["attention_mask"].sum())
        self.real_tokens += real
        # model.unpadded (its batches carry offsets) computes no padding
        self.padded_tokens += real if "offsets" in batch else batch["attention_mask"].numel()

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.micro_batches += 1

    def read(self) -> dict:
        """The window's figures for all ranks together; starts the next window."""
        acc = self.accelerator
        counts = torch.tensor([self.micro_batches, self.samples, self.real_tokens, self.padded_tokens], dtype=torch.float32)
        loss_sum, micro, samples, real, padded = acc.reduce(
            torch.cat([self.loss_sum.float().reshape(1), counts.to(acc.device)]), "sum").tolist()
        elapsed = time.perf_counter() - self.tic
        record = {
            "train/loss": loss_sum / micro,
            "train/samples_per_s": samples / elapsed,
            "train/tokens_per_s": real / elapsed,
            "train/padding_fraction": 1 - real / padded,
            "train/peak_mem_mb": peak_memory_mb(acc.device),
        }
        if self.device_peak:  # model FLOPs utilisation on real (non-padding) tokens
            record["train/mfu"] = self.model_flops(padded / samples) * real / elapsed / (self.device_peak * acc.num_processes)
        self._reset()
        return record


class DtypeProbe:
    """The dtype the forward really computes in, read off the model's last Linear layer at the first step.

    The model's own outputs do not tell: Accelerate converts autocast outputs back to fp32. On a compiled
    model the hook stays (removing it would fail a guard of the compiled graph and compile it again).
    """

    def __init__(self, model: torch.nn.Module, compiled: bool = False):
        self.dtype, self.compiled = None, compiled
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        self._handle = last.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        self.dtype = output.dtype  # unconditional: a compiled graph replays it without a guard on its value

    def remove(self) -> str | None:
        if not self.compiled:
            self._handle.remove()
        return None if self.dtype is None else str(self.dtype).replace("torch.", "")


class NonFiniteGuard:
    """Stops a run whose loss or gradient norm became NaN or infinite, before anything is saved from it.

    Every micro-batch adds to a device-side record of the first bad step (no host synchronisation); the
    record is all-reduced (MIN over ranks) and read only where the run acts: log steps, evaluations and
    every save. A bad value on any rank then stops every rank at the same step with TrainingDiverged.
    Fault injection for tests: HARNESS_FAULT_NONFINITE_STEP=N (and HARNESS_FAULT_NONFINITE_RANK=R, default
    every rank) multiplies that step's loss by NaN before the backward.
    """

    NONE = 2**62

    def __init__(self, accelerator):
        import os

        self.accelerator = accelerator
        self.first_bad = torch.full((), self.NONE, dtype=torch.long, device=accelerator.device)
        step, rank = os.environ.get("HARNESS_FAULT_NONFINITE_STEP"), os.environ.get("HARNESS_FAULT_NONFINITE_RANK")
        self.fault_step = int(step) if step else None
        self.fault_here = rank is None or int(rank) == accelerator.process_index

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.fault_step == step and self.fault_here:
            return loss * float("nan")
        return loss

    def observe(self, step: int, loss: torch.Tensor, grad_norm=None) -> None:
        bad = ~torch.isfinite(loss.detach().float())
        if isinstance(grad_norm, torch.Tensor):
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor (every rank calls this)
                grad_norm = grad_norm.full_tensor()
            bad = bad | ~torch.isfinite(grad_norm.detach().float().to(bad.device))
        self.first_bad = torch.where(bad, torch.minimum(self.first_bad, torch.full_like(self.first_bad, step)), self.first_bad)

    def check(self, newest_good) -> None:
        """Collective: every rank calls it at the same points. Raises on every rank if any rank saw a bad value."""
        first = self.first_bad.clone()
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        if first != self.NONE:
            from harness.errors import TrainingDiverged

            checkpoint = newest_good() or "none (start again)"
            raise TrainingDiverged(
                f"the loss or gradient norm became non-finite at step {first}; nothing was saved after it. "
                f"Newest good checkpoint: {checkpoint}; resume from it with a lower train.lr "
                f"(train.resume=PATH), or check the data of that step"
            )


def compile_report(cuda_graphs: bool = False) -> str:
    """How many graphs torch.compile built in this process, and where it fell back to Python (graph breaks);
    with `cuda_graphs` (compile modes that record them), for how many compiled graphs (forward and backward count
    apart) inductor skipped the CUDA graph: always on CPUs, and on GPUs for reasons its log gives (a skipped
    graph runs compiled, without the graph: no error, only slower)."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    report = f"torch.compile: {counters['stats']['unique_graphs']} graph(s) compiled, {breaks} graph break(s)"
    if cuda_graphs:
        report += f", CUDA graphs skipped for {counters['inductor']['cudagraph_skips']} compiled graph(s)"
    return report


def is_sync_warning(message: str) -> bool:
    """A warning of torch's sync debug mode for one synchronising operation; not the notice, given once when
    the mode is first turned on, that the mode is a prototype (which also says "synchronizing")."""
    return "called a synchronizing CUDA operation" in message


class SyncWatch:
    """`train.sync_debug`: count host-device synchronisations inside training steps (CUDA only).

    Used as `with watch:` around the work of one micro-batch; log, evaluation and checkpoint points stay
    outside, where a synchronisation is expected. Each sync is a warning from torch's sync debug mode.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and torch.cuda.is_available()
        self.count, self.first = 0, None
        self._catcher = None

    def __enter__(self):
        if self.enabled:
            self._catcher = warnings.catch_warnings(record=True)
            self._seen = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(*exc)
            syncs = [w for w in self._seen if is_sync_warning(str(w.message))]
            self.count += len(syncs)
            if syncs and self.first is None:
                self.first = f"{syncs[0].filename}:{syncs[0].lineno}: {syncs[0].message}"
        return False

    @contextlib.contextmanager
    def paused(self):
        """Not counted: what synchronises by design inside a step's span (a CUDA-graph capture, once per shape)."""
        if self.enabled:
            torch.cuda.set_sync_debug_mode("default")
        try:
            yield
        finally:
            if self.enabled:
                torch.cuda.set_sync_debug_mode("warn")

    def report(self) -> str | None:
        if not self.enabled:
            return None
        return f"host synchronisations inside training steps: {self.count}" + (f" (first: {self.first})" if self.first else "")
