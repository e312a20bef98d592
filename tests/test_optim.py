"""AdamW's parameter groups, layer-wise learning-rate decay and the warmup-and-decay schedules (harness.optim)."""

import pytest
import torch

from harness.optim import build_optimizer, lr_schedule


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
    sched = lr_schedule(opt, warmup_steps=4, total_steps=10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])


def test_cosine_schedule_warms_up_then_follows_half_a_cosine_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, warmup_steps=2, total_steps=6, shape="cosine")
    lrs = []
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([0.5, 1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2, 0.0])


def test_layer_wise_decay_gives_each_depth_its_rate(tiny_model):
    """The tiny BERT has 2 layers: classifier and pooler at lr, layer 1 at lr x d, layer 0 at lr x d^2, embeddings at
    lr x d^3; weight decay still only where it applies; every parameter in one group."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    groups = build_optimizer(model, 1.0, 0.01, layer_decay=0.5).param_groups
    rate = {n: g["lr"] for g in groups for p in g["params"] for n, q in model.named_parameters() if q is p}
    assert len(rate) == len(list(model.parameters()))
    assert rate["classifier.weight"] == rate["bert.pooler.dense.weight"] == 1.0
    assert rate["bert.encoder.layer.1.attention.self.query.weight"] == 0.5
    assert rate["bert.encoder.layer.0.output.dense.bias"] == 0.25
    assert rate["bert.embeddings.word_embeddings.weight"] == rate["bert.embeddings.LayerNorm.weight"] == 0.125
    names = {id(p): n for n, p in model.named_parameters()}
    assert all((g["weight_decay"] == 0.0) == any(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)]
                                                 for p in g["params"]) for g in groups)
