"""Shared fixtures: offline settings, a tiny random BERT built in-process, the DDP reference run.

Helpers (runners, recipe writer, paths) are in tests/helpers.py. Multi-process tests start real ranks
with `accelerate launch` and the shipped CPU launch config (gloo).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import harness, minilm_path, ok, write_config

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread per process, for this worker and every run it starts, as torchrun already gives each rank of a
# 2-rank launch: the suite runs two xdist workers on a 2-core machine, and a 1-process run with torch's default (a
# thread per core) beside the other worker's runs oversubscribes the cores. test_train, test_graphs and
# test_compile under `-n 2` (27 tests) ran in 173 and 174 s with 2 threads, in 137 and 119 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT classifier with the bert-base-uncased WordPiece tokenizer."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tiny_bert(out: Path) -> Path:
    """The tiny model, saved to `out`: the same weights every time (seed 0)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once per test session, even when pytest-xdist runs the session's tests
    in several workers (each with its own session fixtures): the first worker to ask builds it under a file lock in
    the folder the workers share, and the others wait for it and read what it built. Nothing else writes there."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this session's pytest-N/, above each worker's popen-gwN/
    folder, done = shared / name, shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def ddp_ten_steps(tmp_path_factory):
    """The reference for the sharded runs: 10 steps of DDP on 2 gloo ranks, batch 4 per rank, fp32, a checkpoint
    at step 5, each step's examples in metrics.jsonl.

    Returns (config, output folder); the sharded tests train the same config into their own folders. The
    tests that use it sit in three modules, which the suite's `--dist loadfile` may give to different workers,
    so it is built once for all of them, with its own copy of the tiny model (`built_once`).
    """
    def build(tmp):
        model = tiny_bert(tmp / "tiny-bert")
        cfg = write_config(tmp / "c.yaml", model, tmp / "ddp",
                           data={"train_samples": 48}, train={"max_steps": 10, "lr": 3e-3, "eval_every": 100,
                                                              "save_every": 5, "record_examples": True})
        ok(harness("train", "--config", str(cfg), procs=2))

    tmp = built_once(tmp_path_factory, "ddp", build)
    return tmp / "c.yaml", tmp / "ddp"


