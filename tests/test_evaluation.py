import json

import pytest
import torch

from harness.evaluation import classification_metrics
from tests.helpers import harness, ok, write_config


def test_metrics_against_hand_counts():
    preds = torch.tensor([1, 1, 0, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 0, 1, 1])
    m = classification_metrics(preds, labels, torch.tensor([0.5] * 6), 2)
    # class 1: tp 2, predicted 3, actual 3 -> p = r = f1 = 2/3; class 0: tp 2, predicted 3, actual 3 -> 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == m["recall"] == m["f1"] == pytest.approx(2 / 3)
    assert m["num_examples"] == 6 and m["loss"] == pytest.approx(0.5)


def test_a_class_never_predicted_scores_zero_not_nan():
    m = classification_metrics(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.zeros(2), 2)
    assert m["precision"] == pytest.approx(0.25) and m["recall"] == pytest.approx(0.5)


@pytest.fixture
def decisive_model(tiny_model, tmp_path):
    """The tiny model with a 100x classifier: a random model's logits are near ties, and 1 vs 2 processes
    (2 threads vs 1) may round a tie either way; these predictions are far from any tie."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    model.save_pretrained(tmp_path / "decisive")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "decisive")
    return tmp_path / "decisive"


def test_two_ranks_evaluate_every_example_once_with_the_same_metrics(tmp_path, decisive_model):
    """41 examples, batch 4 per rank: Accelerate pads the last round with repeats, which must be dropped."""
    cfg = write_config(tmp_path / "c.yaml", decisive_model, tmp_path / "unused",
                       data={"eval_samples": 41}, train={"eval_batch_size": 4})
    one = json.loads(ok(harness("evaluate", "--model", str(decisive_model), "--config", str(cfg))).stdout.strip().splitlines()[-1])
    r = ok(harness("evaluate", "--model", str(decisive_model), "--config", str(cfg), procs=2))
    assert "evaluated 41 examples on 2 process(es)" in r.stderr, "the launch really started two ranks"
    two = json.loads(r.stdout.strip().splitlines()[-1])
    assert one["num_examples"] == two["num_examples"] == 41
    for key in ("accuracy", "f1", "precision", "recall"):
        assert one[key] == two[key], key
    assert 0 < one["accuracy"] < 1, "both classes predicted: the comparison is not trivial"
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert json.loads((decisive_model / "eval_results.json").read_text())["num_examples"] == 41
