"""harness's variants x per-device batches on one NVIDIA GPU: samples/s, real tokens/s, MFU and compile time apart.

    python -m benchmarks.gpu_bench --batches 8,128 --variants eager,default,step_graphs_layers,unpadded
    python -m benchmarks.gpu_bench --summary OUT      # gpu.sh's one table of throughput.json and gpu_results.json

bert-base's shape with random weights and reviews with IMDb's token lengths (common.build_assets), max_length 512,
bf16; each variant a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import VARIANTS, report, reuse_or_build_assets, run_child, timed_windows
from harness.recipes import load_config
from harness.trainer import train


def run(model_dir: Path, data_dir: Path, out: Path, batch: int, steps: int, variant: str, warmup: int,
        peak_flops: float | None = None) -> dict:
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "model.num_labels=2", f"data.dataset={data_dir}", "data.max_length=512",
        "data.eval_samples=256", "data.num_workers=2", f"train.output_dir={out}", f"train.max_steps={steps}",
        f"train.per_device_batch_size={batch}", "train.lr=2e-5", "train.warmup_steps=0.1", "train.log_every=10",
        f"train.eval_every={10 * steps}", *VARIANTS[variant],
        *([f"train.peak_flops={peak_flops}"] if peak_flops else []),
    ])
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/mfu" in r]
    timed = timed_windows(records, batch, warmup)
    started = json.loads((out / "launches.jsonl").read_text().splitlines()[0])  # what really ran
    return {
        "batch": batch, "variant": variant, "steps": steps, "wall_s": round(wall, 1),
        "ran": f"{started['parallelism']}, {started['mixed_precision']}",
        # compilation / capture and warm-up, apart from the steady state: the first `warmup` steps' wall time
        "first_steps_s": round(sum(10 / r["train/samples_per_s"] * batch for r in records if r["step"] <= warmup), 1),
        **{k: timed[k] for k in ("tokens_per_s", "samples_per_s", "mfu", "padding_fraction")},
        "peak_mem_mb": max(r["train/peak_mem_mb"] for r in records if r["step"] > warmup),
    }


def summary(throughput: dict | None, bench: dict | None) -> str:
    """gpu.sh's one table: throughput.py's systems at batch 8 (the seed, the Trainer, harness), then gpu_bench's
    variants by batch, each with its ratio to the seed and to the Trainer where they ran at the same batch, and the
    time that 75,000 samples take at each rate (the reference recipe, 25,000 reviews x 3 epochs, at batch 8)."""
    rows = []  # (batch, name, samples/s, real tokens/s, MFU or None, padding, peak MB, first steps or None)
    if throughput:
        batch = throughput["args"]["batch"]
        for name, m in throughput["median"].items():
            rows.append((batch, name, m["samples_per_s"], m["tokens_per_s"], None, m["padding_fraction"],
                         m["peak_mem_mb"], None))
    for r in (bench or {}).get("results", []):
        rows.append((r["batch"], f"harness {r['variant']}", r["samples_per_s"], r["tokens_per_s"], r["mfu"],
                     r["padding_fraction"], r["peak_mem_mb"], r["first_steps_s"]))
    refs = {(b, name): v for b, name, v, *_ in rows if name in ("seed", "trainer")}
    lines = ["| batch | system | samples/s | real tokens/s | MFU | padding | peak memory (MB) | first steps (s) | "
             "vs seed | vs Trainer | 75,000 samples (min) |", "| --- " * 11 + "|"]
    for batch, name, rate, tokens, mfu, padding, mem, first in rows:
        ratios = [f"{rate / refs[batch, ref]:.2f}x" if (batch, ref) in refs else "-" for ref in ("seed", "trainer")]
        lines.append(f"| {batch} | {name} | {rate:.1f} | {tokens:.0f} | {'-' if mfu is None else f'{mfu:.1%}'} | "
                     f"{padding:.1%} | {mem:.0f} | {'-' if first is None else first} | {' | '.join(ratios)} | "
                     f"{75_000 / rate / 60:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=25000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50, help="steps excluded from the medians (compilation, warm-up)")
    p.add_argument("--batches", default="32,8")
    p.add_argument("--variants", default="v0.1,autocast,default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--peak-flops", type=float, help="override the card's peak (needed off the known GPUs)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--assets", help="folder for the model and data: built there if absent, else reused")
    p.add_argument("--build-only", action="store_true", help="build --assets and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)  # BATCH:VARIANT, one run in a fresh process
    p.add_argument("--summary", metavar="DIR", help="print one table of DIR's throughput.json and gpu_results.json")
    args = p.parse_args()
    if args.summary:
        found = {name: json.loads((Path(args.summary) / name).read_text()) if (Path(args.summary) / name).is_file()
                 else None for name in ("throughput.json", "gpu_results.json")}
        device = (found["gpu_results.json"] or {}).get("device", "unknown device")
        print(f"{device}, bert-base, max_length 512\n{summary(found['throughput.json'], found['gpu_results.json'])}")
        return 0
    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if args.build_only:
        device = "assets only"
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    root = Path(args.assets) if args.assets else Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    model_dir, data_dir = reuse_or_build_assets(root, args.examples)
    print(f"assets ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.build_only:
        return 0
    if args.child:  # one run, in its own process: no Accelerate state or compiled graphs carried over
        batch, variant = args.child.split(":")
        report(run(model_dir, data_dir, Path(tempfile.mkdtemp()) / "run", int(batch), args.steps, variant,
                   args.warmup, args.peak_flops))
        return 0
    results = []
    child_args = [f"--assets={root}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                  *([f"--peak-flops={args.peak_flops}"] if args.peak_flops else [])]
    for batch in (int(b) for b in args.batches.split(",")):
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}: choose among {', '.join(VARIANTS)}")
            try:
                r = run_child("benchmarks.gpu_bench", child_args, f"{batch}:{variant}")
            except SystemExit as e:  # one variant failing (say, CUDA graphs) must not lose the others' figures
                print(f"variant {variant} at batch {batch} failed: {e}", flush=True)
                continue
            results.append(r)
            print("RESULT " + json.dumps(r), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "gpu_results.json").write_text(json.dumps({"device": device, "results": results}, indent=2))
    print("\n| batch | variant | ran as | samples/s | real tokens/s | MFU | padding | peak memory (MB) | first steps (s) | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['batch']} | {r['variant']} | {r['ran']} | {r['samples_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
              f"{r['mfu']:.1%} | {r['padding_fraction']:.1%} | {r['peak_mem_mb']:.0f} | {r['first_steps_s']} | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
