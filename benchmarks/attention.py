"""Attention kernels, forward and backward, on the batches harness trains on: padded or packed, timed apart.

`model.unpadded` removed the 14.1% padding of a batch-128 step on an H100 but bought only 1.06x real tokens/s
(twelfth session). One suspect is the kernel: the padded run's SDPA with a mask goes to the backend torch picks
(cuDNN's on the H200 profile), the packed run to FlashAttention's variable-length kernel. This script times, on
one epoch's batches in harness's own order (StepBatchSampler, length-grouped, over reviews with IMDb's token
lengths as gpu_bench builds them), each kernel's forward and backward for one layer, and checks its output
against an fp32 reference per example (no dropout):

- `sdpa_masked`: the batch padded to a multiple of `--pad` tokens with the 4D boolean mask harness gives SDPA
  (its default on GPUs), through the backend torch picks; `sdpa_masked_cudnn` and `sdpa_masked_efficient` force
  one (GPU only);
- `flash_varlen`: harness.modeling.packed_attention's FlashAttention call on the packed real tokens (model.unpadded
  on GPUs);
- `cudnn_varlen`: cuDNN's attention on the same packed tokens through its sequence offsets
  (`aten._cudnn_attention_forward`, what torch's nested tensors call when they pick cuDNN; GPU only; not used by
  harness). Only when asked for (`--kernels`): on the H100 (torch 2.11, cuDNN 9.19) it took 151 ms per batch of
  128, 126x the padded kernel, and a training run through it had a non-finite loss at its first step;
- `runs`: packed_attention's CPU kernel (model.unpadded on CPUs).

A kernel the device lacks, or that fails, is reported with its reason; the others still run.

    python -m benchmarks.attention --batch 128                      # the bert-base shape, bf16, on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from harness.attention import attention_mask_for, packed_attention

GPU_KERNELS = ("sdpa_masked", "sdpa_masked_cudnn", "sdpa_masked_efficient", "flash_varlen")  # by default
CPU_KERNELS = ("sdpa_masked", "runs")


def review_token_lengths(examples: int, max_length: int, seed: int = 0) -> np.ndarray:
    """The token lengths of gpu_bench.build_assets' training reviews (its first draw of the same seeded generator:
    one token per word, plus [CLS] and [SEP]), truncated at max_length as the tokenizer does."""
    from benchmarks.gpu_bench import review_word_counts

    return np.minimum(review_word_counts(np.random.default_rng(seed), examples) + 2, max_length)


def epoch_batches(lengths: np.ndarray, batch: int, seed: int = 0) -> list[np.ndarray]:
    """The lengths of each batch of harness's first epoch on one process (train.seed 0 and group_by_length, the
    defaults)."""
    from harness.data import StepBatchSampler

    sampler = StepBatchSampler(lengths, batch, grad_accum=1, world_size=1, rank=0, seed=seed)
    return [lengths[np.array(b)] for b in sampler]


class Batch:
    """One batch's query, key and value (heads x head size each token), padded and packed from the same values."""

    def __init__(self, lengths: np.ndarray, heads: int, head_dim: int, pad: int, max_length: int, dtype, device,
                 generator: torch.Generator):
        self.lengths = [int(n) for n in lengths]
        width = min(int(math.ceil(max(self.lengths) / pad) * pad), max_length)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).tolist()  # on the host: slicing reads no device
        self.offsets = torch.tensor(self.starts, device=device)
        total, self.max_seqlen = self.starts[-1], max(self.lengths)
        # (1, heads, tokens, head size) packed and (batch, heads, width, head size) padded, both as transformers'
        # layers give them to attention: transposed views of a Linear's (..., tokens, heads x head size) output
        self.packed = [torch.randn(1, total, heads, head_dim, generator=generator, device=device, dtype=dtype)
                       .transpose(1, 2) for _ in range(3)]
        self.mask = torch.zeros(len(self.lengths), width, dtype=torch.bool, device=device)
        self.padded = [torch.zeros(len(self.lengths), width, heads, head_dim, device=device, dtype=dtype)
                       .transpose(1, 2) for _ in range(3)]
        for i, n in enumerate(self.lengths):
            self.mask[i, :n] = True
            for p, x in zip(self.padded, self.packed):
                p[i, :, :n] = x[0, :, self.starts[i]:self.starts[i] + n]
        self.mask4d = attention_mask_for(self.mask, "sdpa", "4d")  # what harness gives SDPA (True = attend)
        self.padded_tokens = len(self.lengths) * width
        self._reference = None

    def real_rows(self, out: torch.Tensor, padded: bool) -> torch.Tensor:
        """(tokens, heads, head size) of the real tokens, whatever layout a kernel returned."""
        if padded:  # (batch, heads, width, size)
            return out.transpose(1, 2)[self.mask]
        return out.reshape(-1, out.shape[-2], out.shape[-1])  # (1, tokens, heads, size) or (tokens, heads, size)

    def reference(self) -> torch.Tensor:
        """Each example's attention over its own tokens, in fp32 (computed once)."""
        if self._reference is not None:
            return self._reference
        outs = []
        for i, n in enumerate(self.lengths):
            q, k, v = (x[0, :, self.starts[i]:self.starts[i] + n].float() for x in self.packed)
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1))
        self._reference = torch.cat(outs)
        return self._reference


def attention_call(kernel: str, batch: Batch, dropout: float):
    """(a function running the kernel's forward on fresh leaf inputs and returning (output, inputs), padded?)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel.startswith("sdpa_masked"):
        backend = {"sdpa_masked_cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa_masked_efficient": SDPBackend.EFFICIENT_ATTENTION}.get(kernel)

        def run():
            q, k, v = (x.detach().requires_grad_() for x in batch.padded)
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, batch.mask4d, dropout), (q, k, v)
        return run, True
    if kernel in ("flash_varlen", "runs"):
        name = "flash" if kernel == "flash_varlen" else "runs"

        def run():
            q, k, v = (x.detach().requires_grad_() for x in batch.packed)
            return packed_attention(q, k, v, batch.offsets, batch.max_seqlen, dropout, kernel=name), (q, k, v)
        return run, False
    if kernel == "cudnn_varlen":
        offsets = batch.offsets.to(torch.int32)

        def run():
            q, k, v = (x.detach().requires_grad_() for x in batch.packed)
            rows = [x[0].transpose(0, 1) for x in (q, k, v)]  # (tokens, heads, size), views
            out = torch.ops.aten._cudnn_attention_forward(*rows, None, offsets, offsets, batch.max_seqlen,
                                                          batch.max_seqlen, True, dropout, False, False)[0]
            return out, (q, k, v)
        return run, False
    raise ValueError(f"unknown kernel {kernel!r}")


def measure(kernel: str, batches: list[Batch], dropout: float, repeats: int, device) -> dict:
    """Forward + backward of every batch, `repeats` times after one untimed pass, and the largest error against
    the reference (no dropout) over the batches."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    stage = "forward"
    try:
        calls = [attention_call(kernel, b, dropout) for b in batches]
        worst = 0.0
        for b, (run, padded) in zip(batches, calls):
            check, _ = attention_call(kernel, b, 0.0)[0]()
            worst = max(worst, (b.real_rows(check.detach(), padded).float() - b.reference()).abs().max().item())
        for timed in (False, True):
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats if timed else 1):
                for run, _ in calls:
                    stage = "forward"
                    out, _ = run()
                    stage = "backward"
                    out.backward(torch.ones_like(out))
            sync()
            seconds = time.perf_counter() - t0
    except Exception as e:  # a kernel this device or build lacks: said, with where it failed, and the others go on
        return {"kernel": kernel, "error": f"{stage}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
    per_batch_ms = seconds / repeats / len(batches) * 1e3
    real = sum(sum(b.lengths) for b in batches)
    return {"kernel": kernel, "ms_per_batch": per_batch_ms, "max_error": worst,
            "real_tokens_per_s": real * repeats / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--examples", type=int, default=3000, help="one epoch of this many reviews (gpu.sh's assets)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=12, help="attention calls per step, for the per-step figure")
    p.add_argument("--pad", type=int, help="padded kernels' multiple (harness's data.pad_multiple=auto: 64 on GPUs, "
                                           "8 on CPUs)")
    p.add_argument("--dropout", type=float, default=0.1, help="attention dropout (bert-base's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernels", help="comma-separated; default: all the device has")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = args.kernels.split(",") if args.kernels else GPU_KERNELS if device.type == "cuda" else CPU_KERNELS
    pad = args.pad or (64 if device.type == "cuda" else 8)
    lengths = review_token_lengths(args.examples, args.max_length)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [Batch(b, args.heads, args.head_dim, pad, args.max_length, torch.bfloat16, device, generator)
               for b in epoch_batches(lengths, args.batch)]
    real = sum(sum(b.lengths) for b in batches)
    padding = 1 - real / sum(b.padded_tokens for b in batches)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}: {len(batches)} batches of {args.batch} (one epoch of {args.examples} "
          f"reviews, harness's order), {args.heads} heads of {args.head_dim}, bf16, dropout {args.dropout}; "
          f"padded kernels: multiples of {pad}, {padding:.1%} padding")
    results = [measure(k, batches, args.dropout, args.repeats, device) for k in kernels]
    base = next((r for r in results if "error" not in r), None)
    print("\n| kernel | forward + backward per batch (ms) | x layers per step (ms) | real tokens/s | vs "
          f"{base['kernel'] if base else '-'} | max error vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['kernel']} | failed: {r['error']} | | | | |")
            continue
        print(f"| {r['kernel']} | {r['ms_per_batch']:.3f} | {r['ms_per_batch'] * args.layers:.2f} | "
              f"{r['real_tokens_per_s']:,.0f} | {base['ms_per_batch'] / r['ms_per_batch']:.2f}x | {r['max_error']:.2e} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "attention.json").write_text(json.dumps(
            {"device": name, "args": vars(args), "padding_fraction": padding, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
