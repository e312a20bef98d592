"""Shared fixtures: offline settings, a tiny random BERT built in-process, the DDP reference run.

Helpers (runners, recipe writer, paths) are in tests/helpers.py. Multi-process tests start real ranks
with `accelerate launch` and the shipped CPU launch config (gloo).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import harness, minilm_path, ok, write_config

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT classifier with the bert-base-uncased WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ddp_ten_steps(tmp_path_factory, tiny_model):
    """The reference for the sharded runs: 10 steps of DDP on 2 gloo ranks, batch 4 per rank, fp32.

    Returns (config, output folder); the sharded tests train the same config into their own folders.
    """
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = write_config(tmp / "c.yaml", tiny_model, tmp / "ddp",
                       data={"train_samples": 48}, train={"max_steps": 10, "lr": 3e-3, "eval_every": 100})
    ok(harness("train", "--config", str(cfg), procs=2))
    return cfg, tmp / "ddp"


