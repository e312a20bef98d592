"""model.unpadded: the classifier computes on the real tokens only (packed, attention per example). Its outputs
and gradients must be those of the padded model, and a run must train like a padded one."""

import dataclasses
import functools
import json
import re

import pytest
import torch
from transformers import LlamaConfig

from harness.config import ModelConfig
from harness.data import Collator
from harness.errors import BadInput
from harness.attention import attention_mask_for, make_unpadded, mask_format
from harness.families import FAMILIES, family_of
from harness.modeling import load_model
from tests.helpers import dropout_free, harness, losses, ok, write_config


def batch_of(lengths, pairs=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = [101, *torch.randint(1000, 20000, (n - 2,), generator=g).tolist(), 102]
        e = {"input_ids": ids, "labels": i % 2}
        if pairs:  # the second segment is the last third
            e["token_type_ids"] = [0] * (n - n // 3) + [1] * (n // 3)
        examples.append(e)
    return Collator(0, 8)(examples), Collator(0, 8, unpadded=True)(examples)


def test_the_collator_says_where_the_real_tokens_are():
    padded, packed = batch_of([5, 9, 3])
    assert padded["input_ids"].shape == (3, 16) and packed["input_ids"].shape == (3, 9)  # the longest, exactly
    assert packed["offsets"].tolist() == [0, 5, 14, 17]
    assert packed["token_index"].tolist() == [*range(0, 5), *range(9, 18), *range(18, 21)]
    flat = packed["input_ids"].flatten()[packed["token_index"]]
    assert flat.tolist() == [t for row, n in zip(padded["input_ids"].tolist(), [5, 9, 3]) for t in row[:n]]


def flash_stand_in(query, key, value, cu_seqlens, max_seqlen, dropout, scale):
    """FlashAttention's variable-length kernel exists on CUDA only: on the CPU, this computes what it computes
    (each example attending to itself), after checking the inputs as its contract wants them (torch's nested SDPA
    calls it so): contiguous (tokens, heads, head size), int32 cumulative lengths, the longest length as an int."""
    assert query.dim() == 3 and all(x.is_contiguous() and x.shape == query.shape for x in (query, key, value))
    bounds = cu_seqlens.tolist()
    assert cu_seqlens.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == query.shape[0]
    assert isinstance(max_seqlen, int) and max_seqlen == max(b - a for a, b in zip(bounds, bounds[1:]))
    outs = [torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (query, key, value)),
                                                             dropout_p=dropout, scale=scale).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs)


def force_kernel(monkeypatch, kernel):
    """Run packed_attention's `kernel` on the CPU: `jagged` (nested tensors), or `flash` through flash_stand_in."""
    import harness.attention as modeling

    monkeypatch.setattr(modeling, "packed_kernel", lambda query: kernel)
    if kernel == "flash":
        monkeypatch.setattr(modeling, "flash_varlen", flash_stand_in)


@pytest.mark.parametrize("kernel", ["runs", "jagged", "flash"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_packed_outputs_and_gradients_match_the_padded_model(tiny_model, pairs, kernel, monkeypatch):
    """fp32: the same logits and gradients as the padded SDPA model; bf16 autocast: within bf16's tolerance of the
    padded model with eager attention (the reference the issue names). `runs` is the CPU's kernel; `jagged` (nested
    tensors) and `flash` (the direct call, its kernel stood in for) are the GPU's, forced here on the CPU."""
    force_kernel(monkeypatch, kernel)
    cfg = ModelConfig(name_or_path=str(tiny_model), num_labels=2)
    padded_model, eager = load_model(cfg), load_model(dataclasses.replace(cfg, attn_implementation="eager"))
    packed_model = load_model(cfg)
    make_unpadded(packed_model)
    padded, packed = batch_of([17, 40, 3, 25, 9], pairs=pairs)
    inputs = {k: padded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in padded}
    packed_inputs = {k: v for k, v in packed.items() if k != "labels"}
    for m in (padded_model, eager, packed_model):
        m.eval()  # no dropout: the packed layout draws other random numbers
        m.zero_grad()

    a, b = padded_model(**inputs).logits, packed_model(**packed_inputs).logits
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(padded_model.named_parameters(), packed_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = eager(**inputs).logits.float(), packed_model(**packed_inputs).logits.float()
    assert out.dtype == torch.float32 and torch.allclose(ref, out, atol=2e-2), (ref, out)
    assert not torch.equal(ref, a)  # the bf16 comparison really ran in bf16


def test_an_unpadded_run_on_two_ranks_trains_like_the_padded_one_and_exports_a_plain_model(tmp_path, tiny_model):
    """2 gloo ranks (DDP through the patched forward), dropout-free so both layouts draw no random numbers: the
    same losses step by step, the same evaluation, no padding computed, and an export that any transformers loads."""
    model_dir = dropout_free(tiny_model, tmp_path / "model", 2)
    recipe = dict(data={"train_samples": 48}, train={"max_steps": 6, "lr": 3e-3, "eval_every": 100})
    runs = {}
    for name, extra in (("padded", []), ("unpadded", ["model.unpadded=true"])):
        cfg = write_config(tmp_path / f"{name}.yaml", model_dir, tmp_path / name, **recipe)
        runs[name] = ok(harness("train", "--config", str(cfg), *extra, procs=2))
        assert "2 process(es)" in runs[name].stdout
    assert losses(tmp_path / "unpadded") == pytest.approx(losses(tmp_path / "padded"), abs=1e-5)
    rows = [json.loads(r) for r in (tmp_path / "unpadded" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/padding_fraction"] for r in rows if "train/loss" in r] == [0.0] * 6
    assert max(r["train/padding_fraction"] for r in map(json.loads, (tmp_path / "padded" / "metrics.jsonl").read_text()
                                                           .splitlines()) if "train/loss" in r) > 0
    results = {name: json.loads((tmp_path / name / "final" / "eval_results.json").read_text()) for name in runs}
    assert results["unpadded"]["num_examples"] == 41
    assert results["unpadded"]["loss"] == pytest.approx(results["padded"]["loss"], abs=1e-5)
    config = json.loads((tmp_path / "unpadded" / "final" / "config.json").read_text())
    assert "harness_unpadded" not in json.dumps(config)  # the export is a plain BERT classifier
    again = json.loads(ok(harness("evaluate", "--model", str(tmp_path / "unpadded" / "final"), "--config",
                                  str(tmp_path / "unpadded.yaml"))).stdout.strip().splitlines()[-1])
    assert again["loss"] == pytest.approx(results["unpadded"]["loss"], abs=1e-5)  # scored padded, by a fresh process


def test_compiled_layers_run_the_packed_attention_eagerly_and_train_like_the_eager_unpadded_model(tmp_path, tiny_model):
    """train.compile_scope=layers with model.unpadded on the CPU: the layers are compiled around the attention (the
    CPU's kernel reads the offsets on the host: run eagerly), the graphs are shared by the layers, and the losses are
    the eager unpadded run's. (On GPUs the FlashAttention call is compiled with the layers: tested in
    test_compiled_layers_trace_the_flash_call_one_graph_for_every_packed_length.)"""
    model_dir = dropout_free(tiny_model, tmp_path / "model", 2)
    recipe = dict(data={"train_samples": 32}, train={"max_steps": 8, "lr": 3e-3})
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_scope=layers"])):
        cfg = write_config(tmp_path / f"{name}.yaml", model_dir, tmp_path / name, **recipe)
        runs[name] = ok(harness("train", "--config", str(cfg), "model.unpadded=true", *extra, timeout=600))
    graphs = int(re.search(r"torch.compile: (\d+) graph\(s\) compiled", runs["compiled"].stdout).group(1))
    # before, around and after the attention in each nested module of a layer, and an empty one where the CPU's
    # kernel is called eagerly: the same few for 1 layer or 12
    assert 1 <= graphs <= 5, runs["compiled"].stdout[-2000:]
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)


@pytest.mark.parametrize("kernel", ["runs", "jagged", "flash"])
def test_packed_attention_attends_within_each_example_like_masked_sdpa(kernel, monkeypatch):
    """The kernels of packed_attention, run here on the CPU: `jagged` and `flash` are what GPUs run (flash's CUDA
    kernel stood in for), so their layouts, offsets and gradients are checked even where no GPU is."""
    import harness.attention as modeling

    if kernel == "flash":
        monkeypatch.setattr(modeling, "flash_varlen", flash_stand_in)
    packed_attention = functools.partial(modeling.packed_attention, kernel=kernel)

    torch.manual_seed(0)
    lengths, heads, size = [7, 2, 12, 12, 12, 5, 5], 3, 8  # runs of equal lengths: one call each on the CPU
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    # as transformers' layers make them: (1, tokens, heads, head size) projections, seen as (1, heads, tokens, size)
    leaves = [torch.randn(1, sum(lengths), heads, size, requires_grad=True) for _ in range(3)]
    qkv = [x.transpose(1, 2) for x in leaves]
    out = packed_attention(*qkv, offsets, max(lengths))
    assert out.shape == (1, sum(lengths), heads, size)

    # the reference: the examples padded to the longest, a padding mask, one SDPA call
    width = max(lengths)
    padded = [torch.zeros(len(lengths), heads, width, size) for _ in range(3)]
    for i, (a, n) in enumerate(zip(offsets.tolist(), lengths)):
        for p, x in zip(padded, qkv):
            p[i, :, :n] = x[0, :, a:a + n].detach()
    for p in padded:
        p.requires_grad_()
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=mask[:, None, None, :])
    for i, (a, n) in enumerate(zip(offsets.tolist(), lengths)):
        assert torch.allclose(out[0, a:a + n].transpose(0, 1), ref[i, :, :n], atol=1e-5), i

    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    ref_weights = torch.zeros_like(ref)
    for i, (a, n) in enumerate(zip(offsets.tolist(), lengths)):
        ref_weights[i, :, :n] = weights[0, a:a + n].transpose(0, 1)
    (ref * ref_weights).sum().backward()
    for x, p in zip(leaves, padded):
        for i, (a, n) in enumerate(zip(offsets.tolist(), lengths)):
            assert torch.allclose(x.grad[0, a:a + n].transpose(0, 1), p.grad[i, :, :n], atol=1e-5), i


def test_the_flash_kernel_call_is_one_torch_accepts_forward_and_backward():
    """The real FlashAttention operator, on meta tensors (no device, no arithmetic): torch's own shape and dtype
    checks accept harness's call, dropout included, and its autograd formula gives each input a gradient."""
    from harness.attention import packed_attention

    tokens, heads, size = 21, 3, 64
    leaves = [torch.empty(1, tokens, heads, size, device="meta", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]
    offsets = torch.empty(4, dtype=torch.int64, device="meta")  # the collator's (3 examples)
    out = packed_attention(*(x.transpose(1, 2) for x in leaves), offsets, 9, 0.1, None, kernel="flash")
    assert out.shape == (1, tokens, heads, size) and out.dtype == torch.bfloat16
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in leaves)


def test_compiled_layers_trace_the_flash_call_one_graph_for_every_packed_length(tiny_model, monkeypatch):
    """On GPUs with FlashAttention, a compiled layer holds the attention call: one graph, without a break around it,
    for packed batches of any length, and its backward. Checked on meta tensors with the real operator (torch's
    compiler traces it, aot_eager runs its meta kernels), the GPU's kernel choice forced; fullgraph refuses a break."""
    import harness.attention as modeling
    from torch._dynamo.utils import counters

    monkeypatch.setattr(modeling, "packed_kernel", lambda query: "flash")
    model = load_model(ModelConfig(name_or_path=str(tiny_model), num_labels=2))
    make_unpadded(model)
    layer = model.bert.encoder.layer[0].to(device="meta", dtype=torch.bfloat16).train()  # dropout in the kernel too
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens, examples, longest in ((57, 4, 30), (130, 9, 41), (23, 2, 12)):
        hidden = torch.empty(1, tokens, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
        offsets = torch.empty(examples + 1, dtype=torch.int64, device="meta")
        out = compiled(hidden, offsets=offsets, max_seqlen=longest)
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (1, tokens, 32)
        out.sum().backward()
        assert hidden.grad is not None and hidden.grad.shape == hidden.shape
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


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

    sdpa = AutoModelForSequenceClassification.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    eager = AutoModelForSequenceClassification.from_pretrained(tiny_model, attn_implementation="eager").eval()
    ids, mask = _padded_batch(sdpa.config.vocab_size)
    four_d = attention_mask_for(mask, "sdpa", "4d")
    assert four_d.shape == (4, 1, 1, 32) and four_d.dtype == torch.bool
    assert attention_mask_for(mask, "eager", "4d") is mask and attention_mask_for(mask, "sdpa", "2d") is mask
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



def test_auto_mask_is_4d_on_gpus_and_wherever_a_host_check_would_break_a_graph():
    """For plain encoders; a family that handles its own mask (a causal decoder, local windows) keeps its 2D mask."""
    cpu, gpu, bert = torch.device("cpu"), torch.device("cuda"), FAMILIES["bert"]
    assert mask_format("auto", bert, cpu, no_host_check=False) == "2d"
    assert mask_format("auto", bert, cpu, no_host_check=True) == "4d"  # layers compiled apart, steps as CUDA graphs
    assert mask_format("auto", bert, gpu, no_host_check=False) == "4d"
    assert mask_format("2d", bert, gpu, no_host_check=True) == "2d" and mask_format("4d", bert, cpu, no_host_check=False) == "4d"
    for own in (FAMILIES["modernbert"], family_of(LlamaConfig())):
        assert mask_format("auto", own, gpu, no_host_check=True) == "2d"