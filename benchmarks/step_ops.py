"""Operators dispatched per training step of `harness train`: the host work of a step, counted, not timed.

    python -m benchmarks.step_ops                        # fp32, bf16 autocast, bf16 master weights; CUDA if there is one
    python -m benchmarks.step_ops --systems bf16 --top 25

At a small batch a GPU step is bound by the host: every operator the dispatcher runs costs microseconds of
Python, dispatch and (for most) a kernel launch, whatever the arithmetic. The count is the same on any host,
so it can be taken on a CPU and compared across changes. Each system is `harness train` on overhead.py's
narrow bert-base graph (12 layers, 12 heads, hidden 96), eager, run twice in one process under a
TorchDispatchMode that counts every operator reaching the kernels (forward, backward, clipping, optimizer,
logging); the difference between a run of --steps[1] and one of --steps[0] steps, divided by their
difference, is the count per optimizer step, free of what every run does once (loading, evaluation, saving).

- fp32: no mixed precision (as on a CPU without a launch config);
- bf16: autocast to bf16, as the GPU launch configs ship (`mixed_precision: bf16`);
- bf16_master: the same launch precision with `train.bf16_mode=master_weights` (bf16 weights, fp32 masters).

The table groups operators: casts (`_to_copy`, autocast's copies of weights and activations and their
gradients), matmuls, views (metadata only: no kernel), and the rest.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

from benchmarks._children import report, run_child

# system: (launch precision, train.bf16_mode)
SYSTEMS = {"fp32": ("no", "autocast"), "bf16": ("bf16", "autocast"), "bf16_master": ("bf16", "master_weights")}
GROUPS = {
    "casts": {"aten._to_copy"},
    "matmuls": {"aten.mm", "aten.addmm", "aten.bmm"},
    "views (no kernel)": {"aten.view", "aten.t", "aten.transpose", "aten._unsafe_view", "aten.expand", "aten.detach",
                          "aten.select", "aten.slice", "aten.unsqueeze", "aten.permute", "aten.alias", "aten.as_strided"},
}


def count_run(args, steps: int) -> collections.Counter:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.overhead import recipe
    from harness.trainer import train

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    run_args = argparse.Namespace(**{**vars(args), "steps": steps})
    cfg = recipe(run_args, Path(tempfile.mkdtemp()) / "run", "harness")
    cfg.train.bf16_mode = SYSTEMS[args.child][1]
    counter = Count()
    with counter:
        train(cfg)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counter.ops


def run_system(args) -> dict:
    short, long = args.steps
    a, b = count_run(args, short), count_run(args, long)
    per_step = {op: (b[op] - a[op]) / (long - short) for op in b if b[op] != a[op]}
    return {"system": args.child, "ops_per_step": sum(per_step.values()), "by_op": per_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=lambda s: tuple(int(x) for x in s.split(",")), default=(10, 20),
                   help="the two run lengths whose difference is counted (multiples of 10, the log interval)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--top", type=int, default=12, help="operators listed, most frequent first")
    p.add_argument("--assets", help="folder for the narrow model and its data: built there if absent, else reused")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        os.environ["ACCELERATE_MIXED_PRECISION"] = SYSTEMS[args.child][0]
        report(run_system(args))
        return 0
    import torch

    from benchmarks.gpu_bench import reuse_or_build_assets
    from benchmarks.overhead import NARROW_BERT

    root = Path(args.assets or tempfile.mkdtemp())
    reuse_or_build_assets(root, args.examples, model=NARROW_BERT)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    child_args = [f"--assets={root}", f"--batch={args.batch}", f"--max-length={args.max_length}",
                  f"--steps={','.join(map(str, args.steps))}", f"--seed={args.seed}"]
    results = []
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            raise SystemExit(f"unknown system {system!r}: choose among {', '.join(SYSTEMS)}")
        results.append(run_child("benchmarks.step_ops", child_args, system))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2))

    print(f"\ndevice: {device}, torch {torch.__version__}; `harness train`, bert-base graph at hidden 96, batch {args.batch}, "
          f"max_length {args.max_length}; operators per optimizer step (runs of {args.steps[1]} minus {args.steps[0]} steps)")
    names = [*GROUPS, "other"]
    print("| system | all | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 2) + "|")
    for r in results:
        grouped = collections.Counter()
        for op, n in r["by_op"].items():
            grouped[next((g for g, ops in GROUPS.items() if op in ops), "other")] += n
        print(f"| {r['system']} | {r['ops_per_step']:.0f} | " + " | ".join(f"{grouped[g]:.0f}" for g in names) + " |")
    for r in results:
        top = sorted(r["by_op"].items(), key=lambda kv: -kv[1])[: args.top]
        print(f"{r['system']}: " + ", ".join(f"{op.removeprefix('aten.')} {n:.0f}" for op, n in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
