"""Task shapes: each task's metrics against hand counts, the threshold it tunes, its labels as users store them,
and class weights."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import pipeline

from harness.errors import BadInput
from harness.recipes import load_config
from harness.sources import labels_as, synthetic_rows
from harness.tasks import Task, class_weights, regression_metrics, single_label_metrics, tune_threshold
from tests.helpers import REPO, harness, ok, write_config


def test_single_label_metrics_against_hand_counts():
    preds = torch.tensor([1, 1, 0, 0, 1, 0])
    labels = torch.tensor([1, 0, 0, 0, 1, 1])
    m = single_label_metrics(preds, labels, 2)
    # class 1: tp 2, predicted 3, actual 3 -> p = r = f1 = 2/3; class 0: tp 2, predicted 3, actual 3 -> 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == m["recall"] == m["f1"] == pytest.approx(2 / 3)
    task = Task("single_label", 2)
    full = task.metrics(torch.nn.functional.one_hot(preds, 2).float(), labels, torch.tensor([0.5] * 6))
    assert full["num_examples"] == 6 and full["loss"] == pytest.approx(0.5) and full["f1"] == m["f1"]


def test_a_class_never_predicted_scores_zero_not_nan():
    m = single_label_metrics(torch.tensor([0, 0]), torch.tensor([0, 1]), 2)
    assert m["precision"] == pytest.approx(0.25) and m["recall"] == pytest.approx(0.5)


def test_multi_label_metrics_against_hand_counts():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4], [0.7, 0.7, 0.1]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0]])
    m = Task("multi_label", 3, threshold=0.5).metrics(probs, labels.float(), torch.zeros(3))
    # predicted at 0.5: [1,0,1], [0,1,0], [1,1,0]: exact matches rows 0 only
    # label 0: tp 2 / predicted 2 / actual 2; label 1: tp 1 / 2 / 1; label 2: tp 1 / 1 / 2
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx((1 + 0.5 + 1) / 3) and m["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["f1_micro"] == pytest.approx(2 * 4 / (5 + 5))  # tp 4, predicted 5, actual 5
    assert m["threshold"] == 0.5


def test_a_tuned_threshold_is_the_best_micro_f1_and_is_used():
    probs = torch.tensor([[0.35, 0.1], [0.3, 0.32], [0.2, 0.05]])
    labels = torch.tensor([[1, 0], [1, 1], [0, 0]])
    assert tune_threshold(probs, labels) == 0.25  # 0.25 catches all three positives and nothing else
    m = Task("multi_label", 2, threshold="tune").metrics(probs, labels.float(), torch.zeros(3))
    assert m["threshold"] == 0.25 and m["f1_micro"] == 1.0 and m["accuracy"] == 1.0


def test_regression_metrics_against_numpy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    p = y + rng.normal(scale=0.5, size=50)
    p[:5] = p[5]  # ties: Spearman averages their ranks
    m = regression_metrics(torch.tensor(p), torch.tensor(y))
    assert m["pearson"] == pytest.approx(np.corrcoef(p, y)[0, 1])
    stats = pytest.importorskip("scipy.stats", reason="the reference Spearman coefficient")
    assert m["spearman"] == pytest.approx(stats.spearmanr(p, y).statistic)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((p - y) ** 2)))
    assert regression_metrics(torch.ones(3), torch.tensor([1.0, 2, 3]))["pearson"] == 0.0  # constant: no correlation


def test_labels_as_users_store_them_for_each_task():
    names = ["sports", "politics", "tech"]
    assert labels_as("multi_label", [["tech", "sports"], [1], "politics", [0, 1, 1], np.array([1, 0, 0]), []],
                     names, 3, "train") == [[1.0, 0, 1], [0, 1.0, 0], [0, 1.0, 0], [0, 1.0, 1], [1.0, 0, 0], [0, 0, 0]]
    assert labels_as("regression", [3.5, "4.25", 2, np.float32(0.5)], None, 1, "train") == [3.5, 4.25, 2.0, 0.5]
    with pytest.raises(BadInput, match="split 'train' row 1: label 'x' is not a finite number"):
        labels_as("regression", [1.0, "x"], None, 1, "train")
    with pytest.raises(BadInput, match=r"row 0: label \[0, 1\] is a list: for several labels per example set "
                                       r"model.problem_type=multi_label"):
        labels_as("single_label", [[0, 1]], None, 2, "train")
    with pytest.raises(BadInput, match="label 0.37 is not a class id: for numeric targets set model.problem_type=regression"):
        labels_as("single_label", [0.37], None, 2, "train")
    with pytest.raises(BadInput, match="label 'art' is not one of model.label_names"):
        labels_as("multi_label", [["art"]], names, 3, "train")


def test_class_weights_balance_the_training_loss():
    weights = class_weights([0, 0, 0, 1], 3, "auto")
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])  # n / (classes x count); absent: 0
    assert class_weights([0], 2, None) is None and class_weights([0], 2, [1, 2]).tolist() == [1.0, 2.0]
    task = Task("single_label", 2, class_weights=torch.tensor([1.0, 3.0]))
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert task.loss(logits, labels, weighted=True) == pytest.approx(float((plain[0] + 3 * plain[1]) / 4))
    assert task.loss(logits, labels) == pytest.approx(float(plain.mean()))  # evaluation: unweighted


# ---------------------------------------------------------------- the shipped recipes, end to end

def _stand_in(folder: Path, split_names: tuple[str, str], rows) -> Path:
    """The hub dataset's columns, made from synthetic sentences: CI is offline, the hub dataset out of reach."""
    folder.mkdir()
    for split, size in zip(split_names, (64, 41)):
        pd.DataFrame(rows(synthetic_rows(split if split == "train" else "test", size))).to_parquet(
            folder / f"{split}.parquet")
    return folder


def _sts_rows(s):  # a similarity in [0, 5] that the pair's polarity decides
    return {"sentence1": s["text"], "sentence2": s["text"][::-1],
            "label": [4.0 * y + 0.5 * (i % 3) for i, y in enumerate(s["label"])]}


def _emotion_rows(s):  # one or two of the recipe's label ids, as GoEmotions stores them
    return {"text": s["text"], "labels": [[0 if y else 2] + ([27] if len(t.split()) < 8 else [])
                                          for t, y in zip(s["text"], s["label"])]}


@pytest.fixture(scope="module")
def headless(tmp_path_factory, tiny_model):
    """The tiny BERT without its classifier, as bert-base-uncased is: the recipe's task gives it its head."""
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path_factory.mktemp("headless")
    AutoModel.from_pretrained(tiny_model).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


# Overrides the CPU and CI force on the shipped recipes: the tiny model for bert-base-uncased (offline), the stand-in
# for the hub dataset, small sizes and no loader workers; their task settings stay as shipped.
def _cpu(recipe: str, model, data, out) -> list[str]:
    return ["--config", str(REPO / "configs" / recipe), f"model.name_or_path={model}", f"data.dataset={data}",
            "data.max_length=32", "data.num_workers=0", f"train.output_dir={out}", "train.epochs=2",
            "train.per_device_batch_size=8", "train.lr=1e-3", "train.save_every=null", "train.report_to=none"]


def test_the_regression_recipe_trains_scores_on_two_ranks_and_predicts_numbers(tmp_path, headless):
    data = _stand_in(tmp_path / "stsb", ("train", "validation"), _sts_rows)
    ok(harness("train", *_cpu("bert_base_stsb.yaml", headless, data, tmp_path / "run")))
    final = tmp_path / "run" / "final"
    trained = json.loads((final / "eval_results.json").read_text())
    assert {"pearson", "spearman", "rmse", "loss"} <= set(trained) and trained["num_examples"] == 41
    assert json.loads((final / "config.json").read_text())["problem_type"] == "regression"
    scores, predicted = {}, {}
    for procs in (1, 2):
        r = ok(harness("evaluate", "--model", str(final), "--output", str(tmp_path / f"eval{procs}"), procs=procs))
        assert f"evaluated 41 examples on {procs} process(es)" in r.stderr
        scores[procs] = json.loads(r.stdout.strip().splitlines()[-1])
        rows = [json.loads(line) for line in (tmp_path / f"eval{procs}" / "predictions.jsonl").read_text().splitlines()]
        assert all(isinstance(p["predicted"], float) and isinstance(p["label"], float) for p in rows)
        predicted[procs] = {p["id"]: p["predicted"] for p in rows}
        assert not (tmp_path / f"eval{procs}" / "confusion_matrix.json").exists()
    # every example once, its output the same to float rounding (other batches, other padding on 2 ranks)
    assert len(predicted[1]) == 41 and predicted[1].keys() == predicted[2].keys()
    assert all(predicted[1][i] == pytest.approx(predicted[2][i], abs=1e-5) for i in predicted[1])
    for key in ("pearson", "spearman", "rmse", "loss"):
        assert scores[1][key] == pytest.approx(scores[2][key], rel=1e-3) == pytest.approx(trained[key], rel=1e-3)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"text": "a great film", "text_pair": "mlif taerg a"}) + "\n")
    [predicted] = [json.loads(line) for line in ok(harness("predict", "--model", str(final), "--input", str(pairs))).stdout.splitlines()]
    classify = pipeline("text-classification", model=str(final), device="cpu")
    assert predicted["score"] == pytest.approx(classify({"text": "a great film", "text_pair": "mlif taerg a"})["score"], abs=1e-5)


def test_the_multi_label_recipe_tunes_its_threshold_and_predict_uses_it(tmp_path, headless):
    data = _stand_in(tmp_path / "emotions", ("train", "validation"), _emotion_rows)
    ok(harness("train", *_cpu("bert_base_go_emotions.yaml", headless, data, tmp_path / "run")))
    final = tmp_path / "run" / "final"
    trained = json.loads((final / "eval_results.json").read_text())
    assert {"accuracy", "f1", "f1_micro", "precision", "recall", "threshold"} <= set(trained)
    saved = json.loads((final / "config.json").read_text())
    assert saved["problem_type"] == "multi_label_classification" and saved["decision_threshold"] == trained["threshold"]
    scores = {}
    for procs in (1, 2):
        r = ok(harness("evaluate", "--model", str(final), "--output", str(tmp_path / f"eval{procs}"), procs=procs))
        assert f"evaluated 41 examples on {procs} process(es)" in r.stderr
        scores[procs] = json.loads(r.stdout.strip().splitlines()[-1])
        assert scores[procs]["threshold"] == trained["threshold"], "evaluate decides at the saved threshold"
        rows = [json.loads(line) for line in (tmp_path / f"eval{procs}" / "predictions.jsonl").read_text().splitlines()]
        assert all(isinstance(p["label"], list) and isinstance(p["predicted"], list) for p in rows)
        assert all(p["predicted"] == [n for n, q in p["probabilities"].items() if q >= trained["threshold"]]
                   for p in rows)
    for key in ("accuracy", "f1", "f1_micro", "precision", "recall", "num_examples"):
        assert scores[1][key] == scores[2][key] == trained[key], key
    assert set(scores[1]["per_class"]) == set(load_config(REPO / "configs" / "bert_base_go_emotions.yaml").model.label_names)
    out = ok(harness("predict", "--model", str(final), "--probabilities", "a great film", "terrible")).stdout
    for row in map(json.loads, out.splitlines()):
        assert row["labels"] == [n for n, q in row["probabilities"].items() if q >= trained["threshold"]]
        assert row["scores"] == [row["probabilities"][n] for n in row["labels"]]


def test_class_weights_train_and_are_said(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", train={"class_weights": "auto", "max_steps": 2})
    assert "class weights (auto): [1.0, 1.0]" in ok(harness("train", "--config", str(cfg))).stdout  # balanced data


@pytest.mark.parametrize("overrides, message", [
    (["model.problem_type=regression"], "model.num_labels=2 with model.problem_type=regression: regression predicts one"),
    (["model.num_labels=1"], "model.num_labels=1 with model.problem_type=single_label"),
    (["model.problem_type=multi_label", "model.threshold=1.5"], "model.threshold must be 'tune' or a probability"),
    (["model.problem_type=multi_label", "train.class_weights=auto"], "train.class_weights applies to model.problem_type=single_label"),
    (["train.class_weights=[1, -2]"], "train.class_weights must be 'auto' or 2 non-negative numbers"),
    (["train.best_metric=pearson"], "train.best_metric must be one of accuracy, f1, precision, recall, loss (model.problem_type=single_label)"),
    (["model.problem_type=ordinal"], "model.problem_type must be single_label, multi_label or regression"),
])
def test_impossible_task_settings_are_named(overrides, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        load_config(None, overrides)
