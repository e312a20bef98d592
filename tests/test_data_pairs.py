"""Sentence pairs (data.text_pair_column) and more than two classes, through the real CLI."""

import json

import pytest
import torch
from datasets import Dataset

from harness.config import DataConfig
from harness.data import Collator, tokenize
from tests.helpers import harness, ok, write_config

LABELS = ["entailment", "contradiction", "neutral"]
POS, NEG, NOUNS = ["good", "great", "fine"], ["bad", "poor", "awful"], ["movie", "plot", "cast", "score"]


def pairs(n: int, seed: int) -> list[dict]:
    """Premise/hypothesis pairs whose label (3 classes, as names) follows from the words."""
    import random

    rng, rows = random.Random(seed), []
    for i in range(n):
        noun, adj = rng.choice(NOUNS), rng.choice(POS + NEG)
        same, opposite = (POS, NEG) if adj in POS else (NEG, POS)
        label = LABELS[i % 3]
        other = rng.choice([x for x in NOUNS if x != noun])
        hyp = {"entailment": f"the {noun} is {rng.choice(same)}", "contradiction": f"the {noun} is {rng.choice(opposite)}",
               "neutral": f"the {other} is {rng.choice(same)}"}[label]
        rows.append({"premise": f"honestly the {noun} was {adj} " + "and long " * rng.randint(0, 12), "hypothesis": hyp,
                     "label": label})
    return rows


def test_pairs_are_tokenized_together_truncating_the_longer_side(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = Dataset.from_dict({"a": ["word " * 40, "short one"], "b": ["a brief second text", "another"], "label": [0, 1]})
    out = tokenize(ds, tok, DataConfig(text_column="a", text_pair_column="b", max_length=16))
    expected = tok(list(ds["a"]), list(ds["b"]), truncation="longest_first", max_length=16)
    assert out["input_ids"] == expected["input_ids"] and out["token_type_ids"] == expected["token_type_ids"]
    first = out[0]
    assert first["length"] == 16 and first["full_length"] == 40 + 4 + 3, "40 + 4 words, [CLS] and two [SEP]"
    sep = tok.sep_token_id
    assert first["input_ids"][-5:-1] == tok("a brief second text", add_special_tokens=False)["input_ids"], "the short side is whole"
    assert first["input_ids"].count(sep) == 2 and set(first["token_type_ids"]) == {0, 1}
    batch = Collator(tok.pad_token_id, multiple=8)([out[0], out[1]])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape == (2, 16)
    assert batch["token_type_ids"][1, out[1]["length"]:].eq(0).all(), "segment ids padded with 0"


@pytest.fixture
def three_class_model(tiny_model, tmp_path):
    """The tiny BERT with a fresh 3-way classifier head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "three")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "three")
    return tmp_path / "three"


@pytest.mark.slow
def test_a_three_class_sentence_pair_model_trains_evaluates_and_predicts_pairs(tmp_path, three_class_model, capsys):
    tiny_model = three_class_model
    data = tmp_path / "nli"
    data.mkdir()
    for split, n, seed in (("train", 96, 1), ("test", 30, 2)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs(n, seed)))
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out,
                       model={"num_labels": 3, "label_names": LABELS},
                       data={"dataset": str(data), "text_column": "premise", "text_pair_column": "hypothesis",
                             "max_length": 24, "train_samples": None, "eval_samples": None},
                       train={"max_steps": 12, "eval_every": 100})
    ok(harness("train", "--config", str(cfg)))
    final = out / "final"
    ev = ok(harness("evaluate", "--model", str(final)))
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert metrics["num_examples"] == 30 and list(metrics["per_class"]) == LABELS
    assert all(v["support"] == 10 for v in metrics["per_class"].values())
    confusion = json.loads((final / "confusion_matrix.json").read_text())
    assert confusion["labels"] == LABELS and len(confusion["matrix"]) == 3 and sum(map(sum, confusion["matrix"])) == 30
    rows = [json.loads(line) for line in (final / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(list(r["probabilities"]) == LABELS for r in rows) and " [PAIR] the " in rows[0]["text"]
    assert any(r["truncated"] for r in rows), "long premises are cut to 24 tokens"

    # predict takes pairs, and scores them as a hand-run forward with segment ids does
    inputs = pairs(4, 3)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": r["premise"], "text_pair": r["hypothesis"]}) + "\n"
                                               for r in inputs))
    pr = ok(harness("predict", "--model", str(final), "--input", str(tmp_path / "in.jsonl"), "--probabilities"))
    got = [json.loads(line) for line in pr.stdout.strip().splitlines()]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tok = AutoModelForSequenceClassification.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    for row, r in zip(got, inputs):
        assert row["text"] == r["premise"] and row["text_pair"] == r["hypothesis"]
        enc = tok(r["premise"], r["hypothesis"], truncation="longest_first", max_length=24, return_tensors="pt")
        with torch.no_grad():
            p = model(**enc).logits.softmax(-1)[0]
        assert [row["probabilities"][n] for n in LABELS] == pytest.approx(p.tolist(), abs=1e-5)
    from harness.cli import main

    assert main(["predict", "--model", str(final), "a premise alone"]) == 2  # in this process: no launch cost
    assert "was trained on sentence pairs" in capsys.readouterr().err


def test_head_tail_truncation_is_refused_for_pairs(tmp_path, tiny_model, capsys):
    from harness.cli import main

    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run",
                       data={"text_pair_column": "hypothesis", "truncation": "head_tail"})
    assert main(["plan", "--config", str(cfg)]) == 2
    assert "data.truncation=head_tail applies to single texts" in capsys.readouterr().err
