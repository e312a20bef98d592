"""What a run reports while it trains: metrics.jsonl and the trackers, the throughput meter, the host-sync watch.

    meter = Throughput(accelerator, flops_per_token(model), peak_flops(None))
    meter.count(batch)                  # every micro-batch, on the host, before the copy to the device
    record = meter.read(loss_sum)       # at a log step: one all-reduce, the only device sync of the step
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import resource
import time
import warnings

import torch
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from harness.config import TRACKERS
from harness.distributed import failing_rank
from harness.errors import BadInput, WriteFailed, first_line


def trackers(report_to) -> list[str]:
    """`train.report_to` as Accelerate's `log_with` list; a tracker that is not installed is bad input."""
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
        """Collective: a write that fails (a full disk, for metrics.jsonl or a tracker's files) stops every rank with
        WriteFailed, as a checkpoint's does."""
        error = None
        try:
            if self.enabled:
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": step, **values}) + "\n")
            if self.tracking:  # Accelerate logs on the main process only; TensorBoard raises a failed write here
                self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        except OSError as e:
            error = e
        rank = failing_rank(self.accelerator, error is not None)
        if rank >= 0:
            where = getattr(error, "filename", None) or self.path
            raise WriteFailed(f"could not write {where}: {first_line(error) if error else f'failed on rank {rank}'}")

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


class StepLogger:
    """What a run reports as it trains: the progress bar; every train.log_every steps (and at the last) the
    throughput window, loss, learning rate and gradient norm to metrics.jsonl and the trackers; once, the
    first step's time and the dtype the forward computes in."""

    def __init__(self, accelerator, log: MetricsLog, meter: Throughput, probe, log_every: int, total_steps: int,
                 epoch_size: int, guard, say):
        self.accelerator, self.log, self.meter, self.probe, self.guard, self.say = accelerator, log, meter, probe, guard, say
        self.log_every, self.total_steps, self.epoch_size = log_every, total_steps, epoch_size
        self.bar, self.first_tic = None, None

    def start(self, step: int) -> None:
        self.bar = tqdm(total=self.total_steps, initial=step, desc="train", disable=not self.accelerator.is_main_process)
        self.first_tic = time.perf_counter()  # the first step apart: compilation, kernel plans and allocation

    def after_step(self, state, lr: float, grad_norm) -> None:
        self._first_step_once()
        self.bar.update(1)
        if state.step % self.log_every and state.step != self.total_steps:
            return
        self.guard.check()
        record = self.meter.read()
        record.update({"train/lr": lr, "train/samples_seen": state.samples_seen,
                       "train/epoch": state.epoch + state.position / self.epoch_size})
        if grad_norm is not None:
            record["train/grad_norm"] = float(grad_norm)
        self.log.log(state.step, record)
        self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}")

    def _first_step_once(self) -> None:
        if self.probe is not None:  # what the launch config's precision really gave the forward
            self.say(f"compute dtype {self.probe.remove()} (the classifier layer's output)")
            self.probe = None
        if self.first_tic is not None:
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()  # once, outside the steady state
            self.say(f"first step in {time.perf_counter() - self.first_tic:.2f} s (compilation, plans and allocation included)")
            self.first_tic = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


def compile_report(cuda_graphs: bool = False) -> str:
    """How many graphs torch.compile built in this process, and where it fell back to Python (graph breaks);
    with `cuda_graphs` (compile modes that record them), for how many compiled graphs (forward and backward count
    apart) inductor skipped the CUDA graph: always on CPUs, and on GPUs for reasons its log gives (a skipped
    graph runs compiled, without the graph: no error, only slower)."""
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
