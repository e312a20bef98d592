"""Dropout on the CPU: torch's against train.cpu_dropout=fast (harness.dropout.FastCpuDropout), forward and backward.

    python -m benchmarks.cpu_dropout                      # MiniLM's attention at batch 8, 264 tokens, bf16 autocast
    python -m benchmarks.cpu_dropout --batch 8 --length 512 --heads 12 --head-size 64 --dtype fp32

Three measurements, each the median of --repeats, torch's then harness's:
- the mask: drawing a (batch, heads, length, length) dropout multiplier;
- dropout: F.dropout(x, p) forward and backward on a tensor of that shape;
- attention with dropout: F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p) forward and backward,
  with a padding mask (the last eighth of every example but the first is padding), as a BERT layer trains.
What a whole training step gains is benchmarks/throughput.py's `harness` against `harness_torch_dropout`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn import functional as F

from harness.dropout import FastCpuDropout, dropout_multiplier

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn, repeats: int) -> float:
    fn()  # allocation and first-call costs apart
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--length", type=int, default=264)
    p.add_argument("--head-size", type=int, default=32)
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="bf16: under CPU autocast, as harness trains")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.length)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    q, k, v = (torch.randn(args.batch, args.heads, args.length, args.head_size, requires_grad=True) for _ in range(3))
    keep = torch.ones(args.batch, 1, 1, args.length, dtype=torch.bool)
    keep[1:, ..., args.length - args.length // 8:] = False

    def mask_torch():
        torch.empty(shape, dtype=dtype).bernoulli_(1 - args.p)

    def mask_fast():
        dropout_multiplier(shape, args.p, dtype)

    def dropout(fast: bool):
        def run():
            with FastCpuDropout() if fast else contextlib.nullcontext():
                y = F.dropout(x, args.p, training=True)
            y.sum().backward()
        return run

    def attention(fast: bool):
        def run():
            with FastCpuDropout() if fast else contextlib.nullcontext(), autocast:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=args.p)
            out.float().sum().backward()
        return run

    rows = [("mask", timed(mask_torch, args.repeats), timed(mask_fast, args.repeats)),
            ("dropout, forward + backward", timed(dropout(False), args.repeats), timed(dropout(True), args.repeats)),
            ("attention with dropout, forward + backward", timed(attention(False), args.repeats),
             timed(attention(True), args.repeats))]
    print(f"shape {shape}, p {args.p}, {args.dtype}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| what | torch (ms) | fast (ms) | speed-up |")
    print("| --- | --- | --- | --- |")
    for name, slow, fast in rows:
        print(f"| {name} | {slow:.3g} | {fast:.3g} | {slow / fast:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
