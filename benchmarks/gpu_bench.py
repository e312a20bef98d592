"""bert-base throughput and MFU of `harness train` on one NVIDIA GPU, offline (run by benchmarks/gpu.sh).

Builds a bert-base-uncased-sized classifier from BertConfig (random weights: speed does not depend on
them), a WordPiece tokenizer whose words are single tokens, and 25,000 synthetic reviews whose token
lengths follow a log-normal fitted to IMDb (median 237, mean 319 WordPiece tokens), then trains with
harness at max_length 512 in bf16, with and without torch.compile, and prints tokens/s and MFU
(train/mfu of harness: 6 x non-embedding params + 12 x layers x hidden x seq_len FLOPs per real token,
over the card's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._children import report, run_child


def build_assets(root: Path, examples: int, seed: int = 0, model: dict | None = None) -> tuple[Path, Path]:
    """bert-base-uncased's shape (or BertConfig `model` overrides) with random weights, and the reviews."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    model_dir, data_dir = root / "bert-base-random", root / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(30522 - 5)]
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"))
    tok.save_pretrained(model_dir)
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(num_labels=2, **(model or {}))).save_pretrained(model_dir)

    import pandas as pd

    rng = np.random.default_rng(seed)
    for split, n in (("train", examples), ("test", 512)):
        lengths = review_word_counts(rng, n)
        texts = [" ".join(words[j] for j in rng.integers(0, len(words), size=k)) for k in lengths]
        pd.DataFrame({"text": texts, "label": rng.integers(0, 2, size=n)}).to_parquet(data_dir / f"{split}.parquet")
    return model_dir, data_dir


def review_word_counts(rng: np.random.Generator, n: int) -> np.ndarray:
    """n reviews' lengths in words: a log-normal with IMDb's median (237) and mean (319) WordPiece tokens."""
    sigma = math.sqrt(2 * math.log(319 / 237))  # mean / median of a log-normal = exp(sigma^2 / 2)
    return np.clip(rng.lognormal(math.log(237), sigma, size=n).astype(int), 8, 3000)


def reuse_or_build_assets(root: Path, examples: int, model: dict | None = None) -> tuple[Path, Path]:
    """The assets an earlier call left in `root` (--assets), else build_assets' there."""
    if (root / "data" / "test.parquet").is_file():
        return root / "bert-base-random", root / "data"
    return build_assets(root, examples, model=model)


# What each variant changes from harness's defaults (data.pad_multiple=auto: 64 on GPUs; the 4D SDPA mask;
# train.bf16_mode=auto: bf16 weights with fp32 master weights on GPUs; train.cuda_graphs=auto: since the twelfth
# session, whole steps replayed as CUDA graphs on one GPU where they apply, so `default` has them and the variants
# that do not say false too, except where their settings exclude them: unpadded, grad accumulation, compile modes
# that record graphs, a whole compiled model).
VARIANTS = {
    "v0.1": ["data.pad_multiple=8", "model.attention_mask=2d", "train.bf16_mode=autocast",  # how harness 0.1 ran
             "train.cpu_dropout=torch", "train.cuda_graphs=false"],
    "eager": ["train.cuda_graphs=false"],  # the default until the twelfth session: every step launched by the host
    "pad8": ["data.pad_multiple=8"],  # the 4D mask, but up to 64 padded lengths
    "mask2d": ["model.attention_mask=2d"],  # buckets, but transformers' host-side mask check
    "default": [],
    "autocast": ["train.bf16_mode=autocast"],  # fp32 weights under bf16 autocast (the default until master weights)
    "torch_dropout": ["train.cpu_dropout=torch"],  # torch's dropout and SDPA on CPUs (GPUs: the same as default)
    "compile": ["train.compile=true"],
    "cudagraphs": ["train.compile=true", "train.compile_mode=reduce-overhead"],
    # each encoder layer compiled in place, one graph shared by all of them: a fraction of the compile time
    "compile_layers": ["train.compile=true", "train.compile_scope=layers"],
    "cudagraphs_layers": ["train.compile=true", "train.compile_mode=reduce-overhead", "train.compile_scope=layers"],
    # bf16 weights with fp32 master weights and optimizer states, harness's own (no autocast: none of its casts)
    "master": ["train.bf16_mode=master_weights"],
    "master_cudagraphs": ["train.bf16_mode=master_weights", "train.compile=true", "train.compile_mode=reduce-overhead"],
    "master_cudagraphs_layers": ["train.bf16_mode=master_weights", "train.compile=true", "train.compile_mode=reduce-overhead",
                                 "train.compile_scope=layers"],
    # whole training steps captured as CUDA graphs, one per padded length, and replayed (no compilation)
    "step_graphs": ["train.cuda_graphs=true"],
    "step_graphs_autocast": ["train.cuda_graphs=true", "train.bf16_mode=autocast"],
    # the same with each encoder layer compiled (fused kernels) before the captures
    "step_graphs_layers": ["train.cuda_graphs=true", "train.compile=true", "train.compile_scope=layers"],
    # real tokens only: packed, attention per example through FlashAttention's varlen kernel (no mask)
    "unpadded": ["model.unpadded=true"],
    "master_unpadded": ["train.bf16_mode=master_weights", "model.unpadded=true"],
    # compiled layers (one dynamic graph for every length) on eager steps, padded to multiples of 8, not 64: at batch
    # 128, where step graphs bought nothing, the 64-token buckets' padding (14.1%) is work on pad tokens
    "layers_pad8": ["train.compile=true", "train.compile_scope=layers", "train.cuda_graphs=false", "data.pad_multiple=8"],
    # the three together (the FlashAttention call compiled with the layers; no CUDA graphs: the packed length varies)
    "master_unpadded_layers": ["train.bf16_mode=master_weights", "model.unpadded=true", "train.compile=true",
                               "train.compile_scope=layers"],
    # unpadded with compiled layers whose matmuls inductor autotunes (its Triton templates against cuBLAS, the bias
    # and GELU fused into them where a template wins): minutes of compilation
    "unpadded_layers_autotune": ["model.unpadded=true", "train.compile=true", "train.compile_scope=layers",
                                 "train.compile_mode=max-autotune-no-cudagraphs"],
    # the same through DeepSpeed's bf16 optimizer: the shipped ZeRO-1 config, one process
    "zero1": [],
}
LAUNCH_CONFIGS = {"zero1": "launch_configs/accelerate/deepspeed_zero1.yaml"}


def run(model_dir: Path, data_dir: Path, out: Path, batch: int, steps: int, variant: str, warmup: int,
        peak_flops: float | None = None) -> dict:
    from harness.recipes import load_config
    from harness.trainer import train

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


def timed_windows(records: list[dict], batch: int, warmup: int) -> dict:
    """The log windows of one process's run after step `warmup`, as one span (each record covers the steps since
    the one before): samples/s and real tokens/s over the span's whole time, padding over its tokens, MFU weighted by
    each window's time; `windows` holds each window's (real tokens, padded tokens, samples). Not a median of the
    windows' rates, taken metric by metric: with length-grouped batches the windows hold different lengths, and a
    median row could then pair one window's samples/s with another's tokens/s."""
    windows, steps, seconds, busy, previous = [], 0, 0.0, 0.0, 0
    for r in records:
        n, previous = r["step"] - previous, r["step"]
        if r["step"] <= warmup:
            continue
        dt = n * batch / r["train/samples_per_s"]
        real = r["train/tokens_per_s"] * dt
        windows.append((real, real / (1 - r["train/padding_fraction"]), n * batch))
        steps, seconds, busy = steps + n, seconds + dt, busy + r.get("train/mfu", 0.0) * dt
    if not windows:
        raise SystemExit(f"no log window after step {warmup}: run more steps than --warmup")
    real, padded, samples = (sum(w[i] for w in windows) for i in range(3))
    return {"windows": windows, "steps": steps, "seconds": seconds, "samples_per_s": samples / seconds,
            "tokens_per_s": real / seconds, "padding_fraction": 1 - real / padded, "mfu": busy / seconds}


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
    import torch

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
                r = run_child("benchmarks.gpu_bench", child_args, f"{batch}:{variant}", LAUNCH_CONFIGS.get(variant))
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
