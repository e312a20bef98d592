"""End to end through the real CLI: train, evaluate, predict, and the saved model in `pipeline`."""

import json
import shutil

import pytest
import torch

from tests.helpers import harness, losses, ok, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("roundtrip")
    out = tmp / "run"
    cfg = write_config(tmp / "c.yaml", tiny_model, out, data={"train_samples": 96},
                       train={"epochs": 2, "lr": 3e-3, "peak_flops": 1e12})
    result = ok(harness("train", "--config", str(cfg)))
    return cfg, out, result


def test_train_writes_config_metrics_tensorboard_and_an_hf_model(trained):
    cfg, out, result = trained
    assert (out / "config.yaml").is_file() and (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 48 and all(r["train/tokens_per_s"] > 0 for r in train)
    assert 0 <= train[0]["train/padding_fraction"] < 1
    assert all(0 < r["train/mfu"] < 1 and r["train/peak_mem_mb"] > 0 for r in train), "MFU against train.peak_flops"
    # TensorBoard through Accelerate's tracker: the same 48 loss points as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard" / "run").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [r["step"] for r in train]
    assert board.Scalars("train/loss")[-1].value == pytest.approx(train[-1]["train/loss"], rel=1e-6)
    final = json.loads((out / "final" / "eval_results.json").read_text())
    assert final["num_examples"] == 41
    assert json.loads(result.stdout.strip().splitlines()[-1]) == final
    # train.cuda_graphs=auto (the default) runs eager steps on a CPU without a word about graphs
    assert "cuda_graphs" not in result.stdout and "CUDA graphs" not in result.stdout, result.stdout[-2000:]


def test_saved_model_loads_in_from_pretrained_and_pipeline(trained):
    from transformers import AutoModelForSequenceClassification, pipeline

    _, out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    clf = pipeline("text-classification", model=str(out / "final"))
    assert clf("a wonderful film")[0]["label"] in {"negative", "positive"}


def test_evaluate_reproduces_the_in_training_metrics(trained):
    cfg, out, _ = trained
    final = json.loads((out / "final" / "eval_results.json").read_text())
    # no --config: the data and preprocessing come from the training_config.yaml exported beside the model
    r = ok(harness("evaluate", "--model", str(out / "final")))
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(again.pop("per_class")) == {"negative", "positive"}  # and the macro metrics as in training:
    assert again == pytest.approx(final)
    r = ok(harness("evaluate", "--model", str(out / "final"), "--config", str(cfg)))
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["num_examples"] == 41 and metrics["accuracy"] == final["accuracy"]
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)


def test_predict_from_arguments_and_jsonl(trained, tmp_path):
    _, out, _ = trained
    texts = ["a dull plot", "the acting was wonderful and the ending was moving, from start to finish", "dull"]
    r = ok(harness("predict", "--model", str(out / "final"), "--probabilities", "--batch-size", "2", *texts))
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["text"] for row in rows] == texts, "input order, although batches are formed by length"
    # the same numbers as the model run by hand on each text alone (no padding at all)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    for row, text in zip(rows, texts):
        enc = tok(text, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            p = model(**enc).logits.softmax(-1)[0]
        expected = {model.config.id2label[i]: float(p[i]) for i in range(2)}
        assert row["probabilities"] == pytest.approx(expected, abs=1e-5)
        assert row["label"] == max(expected, key=expected.get) and row["score"] == pytest.approx(max(expected.values()), abs=1e-5)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    r = ok(harness("predict", "--model", str(out / "final"), "--input", str(inp)))
    assert len(r.stdout.strip().splitlines()) == 3
    inp.write_text('{"txt": "one"}\n')
    bad = harness("predict", "--model", str(out / "final"), "--input", str(inp))
    assert bad.returncode == 2 and "line 1: expected an object with a string 'text' field" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_finished_run_is_not_redone_and_another_config_is_refused(trained):
    cfg, out, _ = trained
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    again = ok(harness("train", "--config", str(cfg)))
    assert "nothing to do" in again.stdout
    other = harness("train", "--config", str(cfg), "train.lr=0.5")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("harness: error: train.output_dir")
    assert "differs in: train.lr" in other.stderr
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before, "existing results untouched"


def test_overwrite_replaces_a_run_of_another_config(tmp_path, tiny_model):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, train={"max_steps": 3})
    ok(harness("train", "--config", str(cfg)))
    ok(harness("train", "--config", str(cfg), "train.max_steps=4", "train.overwrite=true"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and steps.count(1) == 1, "the old run's records are gone"
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4


def test_bad_data_exits_2_with_one_line_and_no_traceback(tmp_path, tiny_model):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "x", "label": 0}\n{"text": "y", "label": 5}\n')
    (tmp_path / "data" / "test.jsonl").write_text('{"text": "x", "label": 0}\n')
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out",
                       data={"dataset": str(tmp_path / "data"), "train_samples": None, "eval_samples": None})
    r = harness("train", "--config", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "harness: error: split 'train' row 1: label 5 is outside [0, 2) (model.num_labels=2)"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_a_corrupt_model_is_one_line_and_the_corrected_command_trains_in_the_same_folder(trained, tmp_path, capsys):
    """A model.safetensors cut short (a copy that stopped at 90%) is refused with one line by predict, evaluate and
    train, which raised safetensors' own error with a traceback before; train and plan refuse it from the file's
    header, before anything is tokenized. The refused run left only its config.yaml: the corrected command then
    trains into that folder instead of calling it a run of another config."""
    from harness.cli import main

    cfg, out, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(out / "final", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size * 9 // 10])
    expected = f"cannot load model from {broken}: Error while deserializing header: incomplete metadata"
    assert main(["predict", "--model", str(broken), "text"]) == 2
    assert main(["evaluate", "--model", str(broken)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith(f"harness: error: {expected}") for line in errors), errors
    run = tmp_path / "run"
    args = ["--config", str(cfg), f"model.name_or_path={broken}", f"train.output_dir={run}", "train.max_steps=2"]
    expected = (f"harness: error: cannot load model from '{broken}': model.safetensors: Error while deserializing "
                f"header: incomplete metadata, file not fully covered")
    assert main(["plan", *args]) == 2
    assert capsys.readouterr().err.strip() == expected
    r = harness("train", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == expected
    assert "tokenizing" not in r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "harness-run.json"]
    r = ok(harness("train", "--config", str(cfg), f"train.output_dir={run}", "train.max_steps=2"))
    assert "holds the config of a run that trained nothing" in r.stdout and (run / "final" / "config.json").is_file()


def test_a_max_length_beyond_the_models_positions_is_one_line(trained, tmp_path, capsys):
    """The tiny model has 128 positions: max_length 256 failed inside the forward at the first long batch (a
    traceback on the CPU, a device-side assert on a GPU). Now train, evaluate and plan refuse it before any step;
    train from the model's config alone, before it tokenizes the data."""
    from harness.cli import main

    cfg, out, _ = trained
    expected = ("harness: error: data.max_length=256 is longer than the model takes (its max_position_embeddings "
                "is 128): set data.max_length=128 or less")
    assert main(["evaluate", "--model", str(out / "final"), "data.max_length=256"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == expected  # after transformers' loading bar
    run = f"train.output_dir={tmp_path / 'run'}"
    r = harness("train", "--config", str(cfg), "data.max_length=256", run)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == expected
    assert "tokenizing" not in r.stderr and "Loading weights" not in r.stderr
    assert main(["plan", "--config", str(cfg), "data.max_length=256", run]) == 2  # before any GPU is spent
    assert capsys.readouterr().err.strip() == expected
    assert main(["plan", "--config", str(cfg), "data.max_length=128", run]) == 0


def test_early_stopping_keeps_the_best_model_in_final_and_resumes_with_its_count(tmp_path, tiny_model):
    """lr 1e-9: eval accuracy stays flat (the loss moves in its last digits, up or down with the dropout masks
    drawn), so with min_delta 0.01 and patience 2 the evaluations at steps 4 and 6 bring no improvement and the
    run stops at step 6 on both ranks, final/ holding the model of step 2. The count is run state: resumed from
    the step-4 checkpoint (one evaluation without improvement so far) it stops at step 6 again, not at step 8."""
    # the stopping decision reads only evaluation metrics, which are the same on every rank: 2 ranks here
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, train={
        "max_steps": 20, "lr": 1e-9, "eval_every": 2, "save_every": 2, "keep_last": 3, "best_metric": "accuracy",
        "early_stopping_patience": 2, "early_stopping_min_delta": 0.01})
    r = ok(harness("train", "--config", str(cfg), procs=2))
    assert "2 process(es) x batch 4" in r.stdout, "the launch really started two ranks"
    assert (f"early stopping at step 6: eval accuracy did not improve by more than 0.01 in 2 evaluations; "
            f"{out / 'final'} holds the best model, from step 2") in r.stdout
    evals = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    assert evals == [2, 4, 6]
    assert (out / "final" / "model.safetensors").read_bytes() == (out / "best" / "model.safetensors").read_bytes()
    note = json.loads((out / "final" / "eval_results.json").read_text())
    assert note["step"] == 2 and note["early_stopping"]["stopped_at_step"] == 6 and note["early_stopping"]["best_step"] == 2
    assert "finished" in ok(harness("plan", "--config", str(cfg), "--status")).stdout

    shutil.rmtree(out / "final")  # as if the job had been preempted after the checkpoint at step 4
    shutil.rmtree(out / "checkpoints" / "step-00000006", ignore_errors=True)
    # resumed on one process (DDP state resumes on any world size; one process is cheaper here)
    resumed = ok(harness("train", "--config", str(cfg), "train.resume=" + str(out / "checkpoints" / "step-00000004")))
    assert "early stopping at step 6:" in resumed.stdout
    assert json.loads((out / "final" / "eval_results.json").read_text())["early_stopping"]["best_step"] == 2


def test_early_stopping_needs_the_metric_it_watches(tmp_path, tiny_model, capsys):
    from harness.cli import main

    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", train={"early_stopping_patience": 2})
    assert main(["train", "--config", str(cfg)]) == 2  # in this process: the config is refused before any work
    assert "train.early_stopping_patience needs train.best_metric" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gradient_checkpointing_on_two_ranks_gives_the_same_losses(tmp_path, tiny_model):
    """Non-reentrant checkpointing under DDP: each layer's forward is recomputed in the backward from the restored RNG
    state, so every step's loss (dropout included) equals the run without it. Checkpointing draws dropout with torch
    (a recomputed forward runs outside harness's dropout mode), so the reference does too."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "plain", data={"train_samples": 48},
                       train={"max_steps": 6, "log_every": 1, "eval_every": 100, "cpu_dropout": "torch"})
    plain = ok(harness("train", "--config", str(cfg), procs=2))
    checkpointed = ok(harness("train", "--config", str(cfg), "train.gradient_checkpointing=true",
                              f"train.output_dir={tmp_path / 'checkpointed'}", procs=2))
    for r in (plain, checkpointed):
        assert "2 process(es) x batch 4" in r.stdout and "dropout drawn by harness" not in r.stdout
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "checkpointed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(b[s] == pytest.approx(a[s], abs=1e-4) for s in a), (a, b)


def test_a_checkpoint_with_another_number_of_labels_is_reheaded_only_when_asked(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", model={"num_labels": 3, "label_names": None},
                       train={"max_steps": 2, "eval_every": 100})
    refused = harness("train", "--config", str(cfg))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "set model.ignore_mismatched_sizes=true to re-head it" in refused.stderr.strip().splitlines()[-1]
    r = ok(harness("train", "--config", str(cfg), "model.ignore_mismatched_sizes=true", "train.overwrite=true"))
    assert ("harness: warning: model.ignore_mismatched_sizes: classifier.bias, classifier.weight initialised anew"
            in r.stdout)
    assert len(json.loads((tmp_path / "run" / "final" / "config.json").read_text())["id2label"]) == 3
