"""Where a bert-base training step of harness spends its time on one NVIDIA GPU (torch.profiler).

    python3 -m benchmarks.gpu_profile --batch 128 --skip 20 --steps 20
    python3 -m benchmarks.gpu_profile --batch 8 --assets /tmp/a --variant eager   # a gpu_bench.py variant

Builds the offline assets of benchmarks/common.py (or reuses --assets) and runs `harness train`. The
first --skip steps run unprofiled (compilation, attention plans, graph captures, allocation happen there); the
next --steps are profiled. Prints the GPU's kernel time per step against the wall time per step (a busy GPU has
them close: the step is then bound by what the kernels do, not by the host), the kernel time by kind (matrix
multiplications, attention, normalisation, ...: what MFU is made of), the kernels that took the most GPU time,
and the operators that took the most host time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from benchmarks.common import VARIANTS, reuse_or_build_assets, timed_windows
from harness import trainer
from harness.recipes import load_config

# Kinds of CUDA kernels, by what their names contain (lower case), the first match wins (the memory-efficient
# attention's kernels are fmha_cutlass*, inductor's layer norms triton_*_layer_norm*, torch's copies run in an
# elementwise_kernel<..direct_copy_kernel..>): FlashAttention's flash_*, cuDNN's attention *sdpa* (and its backward's
# cudnn::fusion::compute_dot_do_o*); cuBLAS's Hopper
# GEMMs nvjet_* and sm90_xmma_gemm_*, CUTLASS's cutlass_*, inductor's GEMM templates triton_tem_*; inductor's fused
# kernels triton_*; the optimizer's multi_tensor_apply kernels (fused AdamW, the master weights' foreach copies, the
# gradient norm).
KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "compute_dot_do_o")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "triton_tem")),
    ("compiled (Triton)", ("triton",)),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach")),
    ("layer norm", ("layer_norm", "layernorm", "gammabeta")),
    ("softmax", ("softmax",)),
    ("dropout", ("dropout", "bernoulli", "philox")),
    ("embedding", ("embedding", "indexselect", "index_select", "indexing", "index_put", "scatter", "gather")),
    ("memory copy / set", ("memcpy", "memset", "copy_kernel", "catarray")),
    ("reduction", ("reduce_kernel", "reduction")),
    ("elementwise", ("elementwise",)),
)


def kind_of(kernel: str) -> str:
    """What a CUDA kernel does, from its name (KINDS); `other` when nothing matches."""
    name = kernel.lower()
    return next((kind for kind, parts in KINDS if any(p in name for p in parts)), "other")


def kernel_times(events) -> list[tuple[str, float]]:
    """(name, GPU time) of the kernels among the profiler's averaged events. The GPU side of a user annotation
    (torch.profiler's `ProfilerStep*` range around each step) is a span over kernels, not one: counted, it doubled
    the kernel time of a step."""
    return [(e.key, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and not e.key.startswith("ProfilerStep")]


def kernel_time_by_kind(kernels: list[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """(kind, total time, share of the whole) for (kernel name, time) pairs, the largest first."""
    totals: dict[str, float] = defaultdict(float)
    for name, us in kernels:
        totals[kind_of(name)] += us
    whole = sum(totals.values()) or 1.0
    return sorted(((k, v, v / whole) for k, v in totals.items()), key=lambda row: -row[1])


def profiled_steps(prof):
    """A stand-in for harness's Throughput meter whose `count` (once per micro-batch, on the host, outside any
    captured graph) also advances the profiler's schedule: micro-batch k runs in the profiler's step k."""
    class Counting(trainer.Throughput):
        def count(self, batch: dict) -> None:
            prof.step()
            super().count(batch)

    return Counting


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--skip", type=int, default=20, help="steps run before the profile starts")
    p.add_argument("--steps", type=int, default=20, help="steps profiled")
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--assets", help="folder for the model and data: built there if absent, else reused")
    p.add_argument("--variant", default="default", choices=list(VARIANTS), help="common.VARIANTS' overrides")
    args = p.parse_args()
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    root = Path(args.assets) if args.assets else Path(tempfile.mkdtemp())
    model_dir, data_dir = reuse_or_build_assets(root, args.examples)
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "model.num_labels=2", f"data.dataset={data_dir}", "data.max_length=512",
        "data.eval_samples=64", "data.num_workers=2", f"train.output_dir={out}",
        f"train.max_steps={args.skip + args.steps + 1}", f"train.per_device_batch_size={args.batch}",
        f"train.log_every={math.gcd(args.skip, args.steps)}",  # log windows that end where the profile starts
        f"train.eval_every={100 * (args.skip + args.steps)}",  # no evaluation inside the profile: only the run's last
        *VARIANTS[args.variant],
    ])
    # micro-batches 1..skip-1 wait, skip warms the profiler up, skip+1..skip+steps are profiled: the window closes
    # as micro-batch skip+steps+1 is counted (hence the one step more)
    sched = schedule(wait=args.skip, warmup=1, active=args.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched) as prof:
        trainer.Throughput, original = profiled_steps(prof), trainer.Throughput
        try:
            t0 = time.perf_counter()
            trainer.train(cfg)
            wall = time.perf_counter() - t0
        finally:
            trainer.Throughput = original
    events = prof.key_averages()
    kernels = kernel_times(events)
    gpu_ms = sum(us for _, us in kernels) / 1e3 / args.steps

    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    span = timed_windows([r for r in records if "train/samples_per_s" in r and r["step"] <= args.skip + args.steps],
                         args.batch, args.skip)
    step_ms = 1000 * span["seconds"] / span["steps"]
    mfu = f", MFU {100 * span['mfu']:.1f}%" if span["mfu"] else ""
    print(f"\nbatch {args.batch}, variant {args.variant}: {args.skip} steps unprofiled, then {args.steps} profiled "
          f"(the whole run: {wall:.1f} s)")
    print(f"GPU kernel time {gpu_ms:.1f} ms per step, against {step_ms:.1f} ms of wall time per step (steps "
          f"{args.skip + 1}-{args.skip + args.steps}, under the profiler{mfu})")
    print("\nkernel time by kind (per step):")
    for kind, us, share in kernel_time_by_kind(kernels):
        print(f"  {kind:<20} {us / 1e3 / args.steps:8.2f} ms  {100 * share:5.1f}%")
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
