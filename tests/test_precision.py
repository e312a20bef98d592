"""`train.bf16_mode: master_weights`: bf16 weights compute, the optimizer steps fp32 master weights; exports hold
the fp32 masters and checkpoints resume exactly. Two gloo ranks (DDP), the path this mode is for."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from harness.precision import bf16_master_weights
from harness.errors import BadInput
from harness.precision import MasterWeights
from tests.helpers import CPU_LAUNCH, launch, losses, ok, write_config

# The shipped CPU launch config trains in fp32; the GPU ones ship `mixed_precision: bf16`, asked for here on the
# command line, as a user would on a laptop.
BF16 = ["--mixed_precision", "bf16"]


def test_two_ranks_train_bf16_weights_export_fp32_masters_and_resume_exactly(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "saving", data={"train_samples": 32},
                       train={"max_steps": 10, "eval_every": 100, "save_every": 5, "bf16_mode": "master_weights"})
    r = ok(launch(CPU_LAUNCH, "train", "--config", str(cfg), procs=2, launch_args=BF16))
    assert "2 process(es)" in r.stdout
    assert "mixed precision bf16 weights, fp32 master weights" in r.stdout
    assert "compute dtype bfloat16" in r.stdout

    final = tmp_path / "saving" / "final"
    weights = load_file(final / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    # the masters themselves, not bf16 weights widened: updates smaller than bf16's resolution are kept
    assert any((v != v.bfloat16().float()).any() for v in weights.values() if v.is_floating_point())
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(final).dtype == torch.float32

    checkpoint = tmp_path / "saving" / "checkpoints" / "step-00000005"
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert {t.dtype for t in state["master_weights"]} == {torch.float32}
    assert {v.dtype for v in load_file(checkpoint / "model.safetensors").values() if v.is_floating_point()} == {torch.bfloat16}

    resumed = tmp_path / "resumed"
    r = ok(launch(CPU_LAUNCH, "train", "--config", str(cfg), f"train.output_dir={resumed}", f"train.resume={checkpoint}",
                  procs=2, launch_args=BF16))
    assert "2 process(es)" in r.stdout and "resumed from" in r.stdout
    straight, after = losses(tmp_path / "saving"), losses(resumed)
    assert sorted(after) == list(range(6, 11))
    assert {s: straight[s] for s in after} == after, "identical per-step losses after resume"
    again = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights), "the same fp32 weights, bit for bit"


def test_master_weights_apply_under_bf16_one_process_or_ddp_only(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not bf16_master_weights("master_weights"), "fp32 training has no bf16 weights to keep"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert bf16_master_weights("master_weights") and not bf16_master_weights("autocast")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(BadInput, match="train.bf16_mode=master_weights is for one process or DDP"):
        bf16_master_weights("master_weights")


def test_auto_takes_master_weights_on_gpus_with_one_process_or_ddp_only(monkeypatch):
    """The default, `auto`: master weights where a GPU trains with one process or DDP, autocast on CPUs and where DeepSpeed or FSDP decide precision; never an error."""
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not bf16_master_weights("auto"), "CPUs: autocast"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bf16_master_weights("auto"), "a GPU, one process or DDP: master weights"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # `use_cpu: true` in the launch config, on a GPU machine
    assert not bf16_master_weights("auto")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    for engine in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.setenv(engine, "true")
        assert not bf16_master_weights("auto"), f"{engine}: its own precision settings decide"
        monkeypatch.delenv(engine)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not bf16_master_weights("auto"), "fp32 training"


def test_a_tied_weight_gets_one_master_and_stays_tied():
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    masters = MasterWeights(model, optimizer)
    assert len(masters.masters) == 1 and embed.weight is head.weight and embed.weight.dtype == torch.bfloat16
    model(torch.tensor([[1, 2, 3]])).float().sum().backward()
    optimizer.step()
    assert embed.weight.grad is None, "the bf16 gradient went to the master"
    assert torch.equal(embed.weight, masters.masters[0].detach().bfloat16()), "the weights follow the updated master"
    assert set(masters.state_dict(model)) == {"0.weight", "1.weight"}
    assert masters.state_dict(model)["1.weight"].dtype == torch.float32


def test_the_bf16_copies_live_where_the_masters_do():
    # the loop moves the model to the training device before the optimizer takes its parameters as the masters;
    # `meta` stands in for a GPU on a machine without one
    model = nn.Linear(4, 2, device="meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    masters = MasterWeights(model, optimizer)
    assert optimizer.param_groups[0]["params"][0] is masters.masters[0]
    assert {m.device.type for m in masters.masters} == {g.device.type for g in masters.grads} == {"meta"}
    assert model.weight.device.type == "meta" and model.weight.dtype == torch.bfloat16
