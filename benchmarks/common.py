"""What the benchmarks share: running one system in a fresh process, the synthetic bert-base assets, harness's
variants, and reading a run's timed log windows."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "imdb-sample"
# lines of a run that say whether it ran as asked (graphs captured or skipped, compilations, capture failures):
# passed on to the parent's output and its RESULT, since a timing alone cannot tell
NOTES = ("CUDA graphs", "torch.compile", "train.cuda_graphs", "first step in")


def child_env() -> dict:
    """The parent's environment with the repository put first on PYTHONPATH: extended, never replaced, so
    packages that live on PYTHONPATH (wheels unpacked into a folder, as on a machine without pip) still import."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_child(module: str, args: list[str], system: str, launch_config: str | None = None) -> dict:
    """`python -m MODULE ARGS --child SYSTEM` from the repository root; returns its RESULT. With `launch_config`,
    the child runs as one process under `accelerate launch` with that shipped config (e.g. DeepSpeed)."""
    launcher = [] if launch_config is None else [
        "-m", "accelerate.commands.launch", "--config_file", launch_config, "--num_processes", "1"]
    cmd = [sys.executable, *launcher, "-m", module, *args, "--child", system]
    # HARNESS_BENCH_CHILD_TIMEOUT (seconds): a run that has not finished by then (say, a compilation that takes
    # minutes) is stopped with its own children, and counts as failed, so that the others' figures still come back
    timeout = float(os.environ.get("HARNESS_BENCH_CHILD_TIMEOUT") or 0) or None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        print(stdout[-3000:], stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{system} did not finish in {timeout:.0f} s (HARNESS_BENCH_CHILD_TIMEOUT)") from None
    line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(stdout[-3000:], stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{system} failed (exit {proc.returncode})")
    result = json.loads(line[len("RESULT "):])
    result["notes"] = [l.strip() for l in stdout.splitlines() if l.strip().startswith(NOTES)]
    for note in result["notes"]:
        print(f"{system}: {note}", flush=True)
    return result


def report(result: dict) -> None:
    """What a child prints last for its parent."""
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- assets


def build_assets(root: Path, examples: int, seed: int = 0, model: dict | None = None) -> tuple[Path, Path]:
    """bert-base-uncased's shape (or BertConfig `model` overrides) with random weights, a WordPiece tokenizer whose
    words are single tokens, and reviews whose token lengths follow IMDb's (speed does not depend on the weights)."""
    model_dir, data_dir = root / "bert-base-random", root / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(30522 - 5)]
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt"))
    tok.save_pretrained(model_dir)
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(num_labels=2, **(model or {}))).save_pretrained(model_dir)

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


# ---------------------------------------------------------------- harness's variants


# What each variant changes from harness's defaults (on GPUs: padding to multiples of 64, the 4D SDPA mask, bf16
# weights with fp32 masters, whole steps replayed as CUDA graphs where they apply). docs/performance.md cites each.
VARIANTS = {
    "v0.1": ["data.pad_multiple=8", "model.attention_mask=2d", "train.bf16_mode=autocast",  # how harness 0.1 ran
             "train.cpu_dropout=torch", "train.cuda_graphs=false"],
    "default": [],
    "eager": ["train.cuda_graphs=false"],  # every step launched by the host
    "autocast": ["train.bf16_mode=autocast"],  # fp32 weights under bf16 autocast
    "master": ["train.bf16_mode=master_weights"],  # the GPU default, named for the CPU
    "torch_dropout": ["train.cpu_dropout=torch"],  # torch's dropout and SDPA on CPUs (GPUs: the same as default)
    "compile": ["train.compile=true"],
    "compile_layers": ["train.compile=true", "train.compile_scope=layers"],
    "step_graphs_layers": ["train.cuda_graphs=true", "train.compile=true", "train.compile_scope=layers"],
    # real tokens only: packed, attention per example through FlashAttention's varlen kernel (no mask)
    "unpadded": ["model.unpadded=true"],
    # the same with the layers compiled, the FlashAttention call inside their graph (no CUDA graphs: lengths vary)
    "master_unpadded_layers": ["train.bf16_mode=master_weights", "model.unpadded=true", "train.compile=true",
                               "train.compile_scope=layers"],
}


# ---------------------------------------------------------------- reading a run


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
