"""Where a bert-base training step of harness spends its time on one NVIDIA GPU (torch.profiler).

    python3 -m benchmarks.gpu_profile --batch 128 --steps 30
    python3 -m benchmarks.gpu_profile --batch 8 --assets /tmp/a --variant autocast   # a gpu_bench.py variant

Builds the same offline assets as benchmarks/gpu_bench.py (or reuses --assets), runs `harness train` for a few
steps under torch.profiler, and prints the busy fraction of the GPU (kernel time over wall time of the profiled
steps), the operators that took the most GPU time, and those that took the most host (CPU) time: at small
batches a step waits for the host.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_bench import VARIANTS, reuse_or_build_assets


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--examples", type=int, default=8000)
    p.add_argument("--assets", help="folder for the model and data: built there if absent, else reused")
    p.add_argument("--variant", default="default", choices=list(VARIANTS), help="gpu_bench.py's overrides")
    args = p.parse_args()
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    from torch.profiler import ProfilerActivity, profile

    from harness.config import load_config
    from harness.trainer import train

    root = Path(args.assets) if args.assets else Path(tempfile.mkdtemp())
    model_dir, data_dir = reuse_or_build_assets(root, args.examples)
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "model.num_labels=2", f"data.dataset={data_dir}", "data.max_length=512",
        "data.eval_samples=64", "data.num_workers=2", f"train.output_dir={out}", f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}", "train.log_every=10", f"train.eval_every={10 * args.steps}",
        *VARIANTS[args.variant],
    ])
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train(cfg)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    from torch.autograd import DeviceType

    # kernels and copies only: an operator's row repeats the time of the kernels it launched
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    import json
    import statistics

    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    step_ms = statistics.median(1000 * args.batch / r["train/samples_per_s"] for r in records if "train/samples_per_s" in r)
    print(f"\nprofiled {args.steps} steps of batch {args.batch}: wall {wall:.1f} s for the whole run; GPU kernel time "
          f"{gpu_us / 1e3 / args.steps:.1f} ms per step (all kernels, incl. a 64-example eval) against "
          f"{step_ms:.1f} ms of wall time per step under the profiler")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
