"""Host overhead per training step: what a step costs when the model has bert-base's operations but almost no
arithmetic, so that the time measured is Python, the dispatcher, autograd and kernel launches, not compute.

    python -m benchmarks.overhead                                   # CPU or the first GPU, batch 8
    python -m benchmarks.overhead --systems bare,harness,compile --steps 60 --warmup 20

The model is bert-base's graph (12 layers, 12 heads, the same modules and the same number of operations per
step) at hidden size 96 (head size 8), on synthetic reviews (gpu_bench's data) cut at --max-length 64, so
every matrix is tiny. On a GPU the step is then host-bound: its time is the host cost that a batch-8
bert-base step pays before any arithmetic. On a CPU most of it is that cost too (at max_length 512 it is
not: attention's length-squared work then dominates on 2 cores, 0.6 s a step).

- bare:     the same batches from harness's own data loader, and a plain PyTorch loop (autocast where the
            launch precision asks for it, backward, clip_grad_norm_, AdamW (fused on CUDA), scheduler,
            zero_grad): the floor for an eager model;
- harness:  `harness train` as shipped (eager), the same batches, schedule and optimizer;
- compile:  `harness train train.compile=true` (inductor);
- compile_layers: `train.compile=true train.compile_scope=layers` (each encoder layer, one shared graph);
- cudagraphs: `train.compile=true train.compile_mode=reduce-overhead` (CUDA only); cudagraphs_layers: the same
            with `train.compile_scope=layers`.
- step_graphs: `train.cuda_graphs=true`: whole steps captured as CUDA graphs, nothing compiled (CUDA only);
            step_graphs_layers: the same with `train.compile=true train.compile_scope=layers` (compiled, then captured).

Each system runs in its own process; the table gives the median milliseconds per optimizer step over the
logged windows after --warmup steps, and the time of the first --warmup steps apart (compilation, plans).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._children import report, run_child

SYSTEMS = {
    "bare": None,
    "harness": [],
    "compile": ["train.compile=true"],
    "compile_layers": ["train.compile=true", "train.compile_scope=layers"],
    "cudagraphs": ["train.compile=true", "train.compile_mode=reduce-overhead"],
    "cudagraphs_layers": ["train.compile=true", "train.compile_mode=reduce-overhead", "train.compile_scope=layers"],
    "step_graphs": ["train.cuda_graphs=true"],
    "step_graphs_layers": ["train.cuda_graphs=true", "train.compile=true", "train.compile_scope=layers"],
}
# bert-base's graph with almost no arithmetic: same depth, heads and modules, hidden 96 (head size 8)
NARROW_BERT = dict(hidden_size=96, num_attention_heads=12, intermediate_size=384)


def recipe(args, out: Path, system: str):
    from harness.recipes import load_config

    return load_config(None, [
        f"model.name_or_path={args.assets}/bert-base-random", "model.num_labels=2", f"data.dataset={args.assets}/data",
        f"data.max_length={args.max_length}", "data.eval_samples=64", f"train.output_dir={out}", f"train.max_steps={args.steps}",
        f"train.per_device_batch_size={args.batch}", "train.lr=2e-5", "train.warmup_steps=0.1", "train.log_every=10",
        f"train.eval_every={10 * args.steps}", f"train.seed={args.seed}", *(SYSTEMS[system] or []),
    ])


def run_harness(args, system: str) -> dict:
    from harness.trainer import train

    out = Path(tempfile.mkdtemp()) / "run"
    train(recipe(args, out, system))
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/samples_per_s" in r]
    ms = [1000 * args.batch / r["train/samples_per_s"] for r in records]  # one window = log_every steps
    timed = [m for r, m in zip(records, ms) if r["step"] > args.warmup]
    return {"system": system, "ms_per_step": statistics.median(timed),
            "first_steps_s": sum(10 * m for r, m in zip(records, ms) if r["step"] <= args.warmup) / 1000}


def run_bare(args) -> dict:
    """A plain loop over harness's own batches: no Accelerate, no guard, no meter, no logging."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from harness.data import training_data
    from harness.modeling import load_model, load_tokenizer
    from harness.optim import build_optimizer, linear_schedule

    cfg = recipe(args, Path(tempfile.mkdtemp()) / "run", "harness")
    accelerator = Accelerator()  # only for the data loader's sharding (one process) and the launch precision
    set_seed(args.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    _, _, _, train_dl, _ = training_data(cfg, tokenizer, accelerator)
    device = accelerator.device
    model = load_model(cfg.model).to(device).train()
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, fused=device.type == "cuda")
    scheduler = linear_schedule(optimizer, int(0.1 * args.steps), args.steps)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=accelerator.mixed_precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, step = [], 0
    tic = time.perf_counter()
    while step < args.steps:
        for batch in train_dl:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:  # windows of 10 steps, as harness logs them
                sync()
                times.append(time.perf_counter() - tic)
                tic = time.perf_counter()
            if step == args.steps:
                break
    windows = [1000 * t / 10 for t in times]
    first = args.warmup // 10
    return {"system": "bare", "ms_per_step": statistics.median(windows[first:]),
            "first_steps_s": sum(times[:first])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="bare,harness,compile")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64, help="short, so that the step's arithmetic stays negligible")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps excluded from the median (a multiple of 10)")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--assets", help="folder for the narrow model and its data: built there if absent, else reused")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")  # as the GPU launch configs ship
    if args.child:
        report(run_bare(args) if args.child == "bare" else run_harness(args, args.child))
        return 0
    from benchmarks.gpu_bench import reuse_or_build_assets

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    root = Path(args.assets or tempfile.mkdtemp())
    reuse_or_build_assets(root, args.examples, model=NARROW_BERT)
    args.assets = str(root)
    systems = args.systems.split(",")
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}: choose among {', '.join(SYSTEMS)}")
    child_args = [f"--assets={root}", f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                  f"--seed={args.seed}", f"--max-length={args.max_length}"]
    results = []
    for system in systems:
        if system.startswith(("cudagraphs", "step_graphs")) and not torch.cuda.is_available():
            print(f"{system}: skipped (no CUDA device)", flush=True)
            continue
        try:
            results.append(run_child("benchmarks.overhead", child_args, system))
        except SystemExit as e:  # one system failing must not lose the others' figures
            print(f"{system} failed: {e}", flush=True)
            continue
        print("RESULT " + json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "batch": args.batch,
                                               "results": results}, indent=2))
    bare = next((r["ms_per_step"] for r in results if r["system"] == "bare"), None)
    print(f"\ndevice: {device}, torch {torch.__version__}; bert-base graph at hidden 96, batch {args.batch}, "
          f"max_length {args.max_length}, {args.steps} steps, the first {args.warmup} apart")
    print("| system | ms per step | vs bare | first steps (s) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['ms_per_step'] / bare:.2f}x" if bare else "n/a"
        print(f"| {r['system']} | {r['ms_per_step']:.1f} | {ratio} | {r['first_steps_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
