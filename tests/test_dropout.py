"""`train.cpu_dropout: fast`: dropout on CPUs drawn four masks to a 64-bit random number, and attention with dropout
without SDPA's math fallback (harness.dropout.FastCpuDropout). The same distribution and the same formulas as
torch's, checked against references built from the same masks; the training loop uses it on CPUs only."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from harness.dropout import FastCpuDropout, dropout_multiplier
from tests.helpers import dropout_free, harness, losses, ok, write_config


@pytest.mark.parametrize("p", [0.1, 0.5, 0.02])
def test_multiplier_drops_with_probability_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    m = dropout_multiplier((1000, 1000), p, torch.float32)
    dropped = (m == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / m.numel()), "P(drop) = p within 5 standard errors"
    kept = m[m != 0]
    assert torch.all(kept == kept[0]) and kept[0].item() == pytest.approx(1 / (1 - p), rel=2e-5)
    assert m.double().mean().item() == pytest.approx(1.0, abs=5e-3), "E[multiplier] = 1"
    # the draws are independent: neighbours (which share a 64-bit word) are not correlated
    a, b = (m.flatten()[i::4] == 0 for i in (0, 1))
    assert abs((a & b).double().mean().item() - p * p) < 5 * math.sqrt(p * p / a.numel())


def test_multiplier_follows_the_seed_and_the_input_dtype():
    torch.manual_seed(3)
    first = dropout_multiplier((7, 5, 3), 0.1, torch.bfloat16)
    second = dropout_multiplier((7, 5, 3), 0.1, torch.bfloat16)
    torch.manual_seed(3)
    assert torch.equal(dropout_multiplier((7, 5, 3), 0.1, torch.bfloat16), first), "seeded: reproducible"
    assert not torch.equal(first, second), "each call draws new numbers"
    assert first.dtype == torch.bfloat16 and first.shape == (7, 5, 3)


def test_dropout_under_the_mode_is_the_input_times_the_multiplier_with_its_gradient():
    x = torch.randn(4, 9, 16, requires_grad=True)
    torch.manual_seed(1)
    with FastCpuDropout():
        y = nn.Dropout(0.1).train()(x)  # the module calls F.dropout with positional arguments
        same = F.dropout(x, p=0.1, training=False)
    torch.manual_seed(1)
    m = dropout_multiplier(x.shape, 0.1, x.dtype)
    assert torch.equal(y, x * m)
    assert same is x or torch.equal(same, x), "not training: the input unchanged"
    y.sum().backward()
    assert torch.equal(x.grad, m)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_attention_with_dropout_matches_the_formula_with_the_same_mask(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    keep[1, ..., 7:] = False  # the second example is padded after 7 tokens
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    mask = {"bool": keep, "additive": additive, "none": None}[mask_kind]
    torch.manual_seed(5)
    with FastCpuDropout():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1, scale=0.3)
    torch.manual_seed(5)
    scores = q @ k.transpose(-2, -1) * 0.3 + (additive if mask is not None else 0)
    probs = torch.softmax(scores, dim=-1)
    reference = (probs * dropout_multiplier(probs.shape, 0.1, probs.dtype)) @ v
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.testing.assert_close(grads, torch.autograd.grad(reference.sum(), (q, k, v)), rtol=1e-10, atol=1e-12)
    if mask is not None:  # no attention to padding: a key past the mask gets no gradient
        assert torch.all(grads[1][1, :, 7:] == 0)


def test_what_the_mode_leaves_to_torch_is_torchs_result():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    with FastCpuDropout():
        plain = F.scaled_dot_product_attention(q, k, v)  # no dropout: torch's fused kernel
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    x = torch.randn(50, 50)
    torch.manual_seed(2)
    with FastCpuDropout():
        inplace = F.dropout(x.clone(), 0.3, True, inplace=True)
    torch.manual_seed(2)
    assert torch.equal(inplace, F.dropout(x.clone(), 0.3, True, inplace=True)), "in-place dropout: torch's own"


def test_bf16_attention_under_autocast_stays_close_to_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    torch.manual_seed(9)
    with FastCpuDropout(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(9)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    probs = torch.softmax(q64 @ k64.transpose(-2, -1) / 4, dim=-1)
    reference = (probs * dropout_multiplier(probs.shape, 0.1, torch.bfloat16).double()) @ v64
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference, rtol=0.05, atol=0.03)


def test_training_on_the_cpu_draws_harness_masks_unless_told_torch(tmp_path, tiny_model):
    """The real CLI, 3 steps each: with dropout, `fast` and `torch` draw other masks, so their losses differ (the
    mode is in the loop); on a dropout-free model there is nothing to draw and they are equal, bit for bit."""
    runs = {}
    for model, name in ((tiny_model, "dropout"), (dropout_free(tiny_model, tmp_path / "no-dropout", 2), "free")):
        for mode in ("fast", "torch"):
            out = tmp_path / f"{name}-{mode}"
            cfg = write_config(tmp_path / f"{name}-{mode}.yaml", model, out,
                               train={"max_steps": 3, "eval_every": 100, "cpu_dropout": mode})
            r = ok(harness("train", "--config", str(cfg)))
            assert ("dropout drawn by harness (train.cpu_dropout=fast)" in r.stdout) == (mode == "fast")
            runs[name, mode] = losses(out)
    assert runs["dropout", "fast"] != runs["dropout", "torch"]
    assert runs["free", "fast"] == runs["free", "torch"]


def test_bf16_weights_with_an_fp32_additive_mask_stay_bf16():
    """bf16 weights without autocast (train.bf16_mode=master_weights on a CPU) and a mask built in fp32: the
    scores keep the inputs' dtype, so the last matmul does not mix fp32 probabilities with bf16 values."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 4, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 6:] = float("-inf")
    with FastCpuDropout():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
