import json

import pytest
import torch

from tests.helpers import harness, ok, write_config


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
                       data={"eval_samples": 41, "max_length": 12}, train={"eval_batch_size": 4})
    one = json.loads(ok(harness("evaluate", "--model", str(decisive_model), "--config", str(cfg),
                                "--output", str(tmp_path / "one"))).stdout.strip().splitlines()[-1])
    r = ok(harness("evaluate", "--model", str(decisive_model), "--config", str(cfg), "--output", str(tmp_path / "two"),
                   procs=2))
    assert "evaluated 41 examples on 2 process(es)" in r.stderr, "the launch really started two ranks"
    two = json.loads(r.stdout.strip().splitlines()[-1])
    assert one["num_examples"] == two["num_examples"] == 41
    for key in ("accuracy", "f1", "precision", "recall"):
        assert one[key] == two[key], key
    assert 0 < one["accuracy"] < 1, "both classes predicted: the comparison is not trivial"
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert json.loads((tmp_path / "two" / "eval_results.json").read_text())["num_examples"] == 41

    # error analysis: every example once, by its row in the split, the same on 1 and 2 processes
    rows = {n: [json.loads(line) for line in (tmp_path / n / "predictions.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [p["id"] for p in rows["one"]] == [p["id"] for p in rows["two"]] == sorted({p["id"] for p in rows["one"]})
    assert len(rows["one"]) == 41
    for a, b in zip(rows["one"], rows["two"]):
        assert {k: v for k, v in a.items() if k != "probabilities"} == {k: v for k, v in b.items() if k != "probabilities"}
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        assert a["predicted"] == max(a["probabilities"], key=a["probabilities"].get)
    # the rows are the split's rows: each text and label is the synthetic split's own
    from harness.sources import synthetic_rows

    split = synthetic_rows("test")
    names = ["LABEL_0", "LABEL_1"]  # the model's id2label: it was saved without label names
    assert all(p["text"] == split["text"][p["id"]][:200] and p["label"] == names[split["label"][p["id"]]] for p in rows["one"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(decisive_model)
    for p in rows["one"]:  # max_length 12: tokens counted after truncation, `truncated` from the whole text
        full = len(tok(split["text"][p["id"]])["input_ids"])
        assert p["tokens"] == min(full, 12) and p["truncated"] == (full > 12), p
    assert any(p["truncated"] for p in rows["one"]) and not all(p["truncated"] for p in rows["one"])
    confusion = json.loads((tmp_path / "one" / "confusion_matrix.json").read_text())
    assert confusion == json.loads((tmp_path / "two" / "confusion_matrix.json").read_text())
    assert confusion["labels"] == names and sum(map(sum, confusion["matrix"])) == 41
    assert sum(confusion["matrix"][i][i] for i in range(2)) == round(one["accuracy"] * 41)
    per = one["per_class"]
    assert per == two["per_class"] and sum(v["support"] for v in per.values()) == 41
    assert (per["LABEL_0"]["f1"] + per["LABEL_1"]["f1"]) / 2 == pytest.approx(one["f1"])


def test_evaluate_holds_its_output_folder_and_a_cut_short_evaluation_is_not_reported(tmp_path, decisive_model):
    """A second evaluation into a folder in use is refused in one line; the files of one whole evaluation carry a
    manifest written last, and `harness report` shows none of a set the manifest does not match (a kill halfway)."""
    from harness.export import EVALUATION
    from harness.lock import RunLock

    cfg = write_config(tmp_path / "c.yaml", decisive_model, tmp_path / "run",
                       data={"eval_samples": 20, "max_length": 12})
    out = tmp_path / "run" / "final"
    held = RunLock(out / "run.lock", "evaluate --output")
    held.acquire()  # a live evaluation (this process) writes there
    try:
        r = harness("evaluate", "--model", str(decisive_model), "--config", str(cfg), "--output", str(out))
    finally:
        held.release()
    assert r.returncode == 2 and f"harness: error: evaluate --output {out} is in use by another run" in r.stderr
    assert not (out / "predictions.jsonl").exists()
    ok(harness("evaluate", "--model", str(decisive_model), "--config", str(cfg), "--output", str(out)))
    manifest = json.loads((out / EVALUATION).read_text())["files"]
    assert manifest == {n: (out / n).stat().st_size for n in ("eval_results.json", "predictions.jsonl",
                                                             "confusion_matrix.json")}
    assert not (out / "run.lock").exists() and not list(out.glob("*.tmp")), "the lock released, no partial file"
    (tmp_path / "run" / "config.yaml").write_text((tmp_path / "c.yaml").read_text())
    whole = ok(harness("report", str(tmp_path / "run"), "--out", str(tmp_path / "whole.html")))
    assert "confusion matrix (final/" in whole.stdout
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:5]))  # cut short, ending on a newline
    cut = ok(harness("report", str(tmp_path / "run"), "--out", str(tmp_path / "cut.html")))
    assert "the evaluation files in final/ are not one whole evaluation (predictions.jsonl has" in cut.stdout
    assert "confusion matrix (final/" not in cut.stdout and "Most confident mistakes" not in (tmp_path / "cut.html").read_text()


def test_an_output_under_a_file_is_refused_before_the_evaluation(tmp_path, decisive_model):
    cfg = write_config(tmp_path / "c.yaml", decisive_model, tmp_path / "run", data={"eval_samples": 20})
    (tmp_path / "a-file").write_text("not a folder")
    r = harness("evaluate", "--model", str(decisive_model), "--config", str(cfg), "--output", str(tmp_path / "a-file" / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "tokenizing" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"harness: error: evaluate --output {tmp_path / 'a-file' / 'out'}")
