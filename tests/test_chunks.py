"""data.truncation=chunks: long texts as overlapping windows, trained as examples and scored per document, each
document once on any number of ranks."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from harness.config import DataConfig
from harness.data import StepBatchSampler, tokenize
from harness.evaluation import per_document
from harness.tasks import mean_by_document
from tests.helpers import harness, ok, write_config


def test_windows_overlap_cover_every_token_and_keep_the_special_tokens(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = " ".join(f"w{i}" for i in range(40))
    ds = Dataset.from_dict({"text": [long, "short one"], "label": [1, 0]})
    out = tokenize(ds, tok, DataConfig(max_length=16, truncation="chunks", chunk_overlap=4))
    pieces = tok(long, add_special_tokens=False)["input_ids"]
    windows = [w for w, d in zip(out["input_ids"], out["doc"]) if d == 0]
    assert all(w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id and len(w) <= 16 for w in windows)
    inner = [w[1:-1] for w in windows]
    assert inner[0] == pieces[:14] and all(a[-4:] == b[:4] for a, b in zip(inner, inner[1:]))  # 4 shared tokens
    stitched = inner[0] + [t for w in inner[1:] for t in w[4:]]
    assert stitched == pieces, "every token in a window, in order, none twice past the overlaps"
    assert out["doc"].count(1) == 1 and set(zip(out["doc"], out["labels"])) == {(0, 1), (1, 0)}
    assert all(f == len(pieces) + 2 for f, d in zip(out["full_length"], out["doc"]) if d == 0)


def test_a_document_is_the_mean_of_its_windows_wherever_they_ran():
    cols = {"logits": torch.tensor([[1.0, 0.0], [0.0, 4.0], [3.0, 1.0], [2.0, 2.0]]), "doc": torch.tensor([7, 3, 7, 7]),
            "label": torch.tensor([1, 0, 1, 1]), "row": torch.tensor([7, 3, 7, 7]), "full_length": torch.tensor([50, 9, 50, 50])}
    docs = per_document(cols)
    assert docs["row"].tolist() == [3, 7] and docs["label"].tolist() == [0, 1] and docs["length"].tolist() == [9, 50]
    assert docs["logits"].tolist() == [[0.0, 4.0], [2.0, 1.0]]


def test_chunks_train_and_score_each_document_once_on_one_and_two_ranks(tmp_path, tiny_model):
    """max_length 12 splits most synthetic sentences into windows: 41 documents scored, the same on 1 and 2 ranks;
    predict gives one answer per input."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run",
                       data={"max_length": 12, "truncation": "chunks", "chunk_overlap": 3})
    ok(harness("train", "--config", str(cfg)))
    final = tmp_path / "run" / "final"
    trained = json.loads((final / "eval_results.json").read_text())
    assert trained["num_examples"] == 41
    scores = {}
    for procs in (1, 2):
        r = ok(harness("evaluate", "--model", str(final), "--output", str(tmp_path / f"e{procs}"), procs=procs))
        assert f"evaluated 41 examples on {procs} process(es)" in r.stderr
        scores[procs] = json.loads(r.stdout.strip().splitlines()[-1])
        rows = [json.loads(line) for line in (tmp_path / f"e{procs}" / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 41 == len({p["id"] for p in rows}) and not any(p["truncated"] for p in rows)
    assert scores[1]["num_examples"] == scores[2]["num_examples"] == 41
    for key in ("accuracy", "f1", "loss"):
        assert scores[1][key] == pytest.approx(scores[2][key], abs=1e-5) == pytest.approx(trained[key], abs=1e-5)
    texts = ["a wonderful film , the cast is great and the story never lets go of you", "terrible"]
    out = [json.loads(line) for line in ok(harness("predict", "--model", str(final), *texts)).stdout.splitlines()]
    assert [p["text"] for p in out] == texts


def test_documents_stay_whole_in_batches_and_each_window_comes_once_an_epoch():
    """train.chunk_loss=documents: the sampler batches texts (units), every window of a text in the same
    micro-batch, every window once an epoch across 2 ranks, steps counted in texts."""
    windows = [3, 1, 2, 1, 1, 4, 2]  # windows per text
    units, start = [], 0
    for n in windows:
        units.append(list(range(start, start + n)))
        start += n
    lengths = [10] * start
    seen = []
    for rank in (0, 1):
        sampler = StepBatchSampler(lengths, 2, 1, 2, rank, seed=0, units=units)
        assert sampler.epoch_size == len(windows) and sampler.steps() == 2  # 7 texts, 4 a step
        for batch in sampler:
            assert all(set(u) <= set(batch) or not set(u) & set(batch) for u in units), "a text is never split"
            seen += batch
    assert sorted(seen) == list(range(start)), "each window once"


def test_a_documents_loss_is_taken_on_the_mean_of_its_windows():
    logits = torch.tensor([[1.0, 0.0], [0.0, 4.0], [3.0, 1.0]], requires_grad=True)
    means, first = mean_by_document(logits, torch.tensor([7, 3, 7]))
    assert means.tolist() == [[0.0, 4.0], [2.0, 0.5]] and first.tolist() == [1, 0]
    means.sum().backward()
    assert logits.grad.tolist() == [[0.5, 0.5], [1.0, 1.0], [0.5, 0.5]]


def test_training_on_documents_records_whole_texts_on_two_ranks(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run",
                       data={"max_length": 12, "truncation": "chunks", "chunk_overlap": 3, "train_samples": 24},
                       train={"chunk_loss": "documents", "record_examples": True, "epochs": 1})
    r = ok(harness("train", "--config", str(cfg), procs=2))
    assert "2 process(es) x batch 4 x accumulation 1 = 8 per step; 3 steps/epoch" in r.stdout  # 24 texts
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x["train/examples"] for x in rows if "train/examples" in x]
    windows = [i for step in steps for i in step]
    assert len(steps) == 3 and sorted(windows) == list(range(len(windows))) and len(windows) > 24


def test_documents_need_windows(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", train={"chunk_loss": "documents"})
    r = harness("train", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "harness: error: train.chunk_loss=documents takes the windows of data.truncation=chunks (now head)"]
