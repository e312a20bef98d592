"""train.cpu_dropout=fast: dropout and attention with dropout on the CPU without torch's slow paths there."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def dropout_multiplier(shape, p: float, dtype: torch.dtype) -> torch.Tensor:
    """What dropout multiplies its input by: 0 with probability p, else 1 / (1 - p), in the input's dtype (as torch's
    own dropout computes it). p is rounded to a multiple of 1/65536: each 64-bit draw of the CPU generator gives four
    16-bit uniform numbers, where torch's dropout draws one Bernoulli number per element, far slower on CPUs."""
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-2**63, None)  # all 64 bits uniform
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    dropped = _dropped_of_65536(p)
    return (draws >= dropped - 32768).to(dtype).mul_(65536 / (65536 - dropped))


def _dropped_of_65536(p: float) -> int:
    return round(p * 65536)


class FastCpuDropout(TorchFunctionMode):
    """train.cpu_dropout=fast: inside a training forward on the CPU, dropout and attention with dropout without
    torch's slow paths there, for any model (the functions are intercepted, the modules are the model's own):
    - `F.dropout` draws its mask with dropout_multiplier;
    - `F.scaled_dot_product_attention` with dropout: the CPU's fused kernel takes no dropout, so torch runs its
      math fallback (in fp32, with checks on the mask); here matmul, softmax in the input dtype (bf16 under
      autocast, as transformers' eager attention gives it), the dropout multiplier, matmul (docs/performance.md
      has the speed-up).
    Anything else (GPU tensors, no dropout, causal or grouped-query attention) goes to torch unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.dropout:
            x, p, training, inplace = _bind(args, kwargs, ("input", 0.5), ("p", 0.5), ("training", True), ("inplace", False))
            if training and not inplace and _on_cpu(x) and 0 < _dropped_of_65536(p) < 65536:
                return x * dropout_multiplier(x.shape, p, x.dtype)
        elif func is nn.functional.scaled_dot_product_attention:
            q, k, v, mask, p, causal, scale, gqa = _bind(
                args, kwargs, ("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
                ("is_causal", False), ("scale", None), ("enable_gqa", False))
            if not causal and not gqa and q.dim() == 4 and _on_cpu(q) and 0 < _dropped_of_65536(p) < 65536:
                scores = (q * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
                if mask is not None:
                    if mask.dtype == torch.bool:  # True = attend
                        mask = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill_(~mask, float("-inf"))
                    scores = scores + mask.to(scores.dtype)  # an fp32 mask must not widen bf16 scores (v stays bf16)
                probs = nn.functional.softmax(scores, dim=-1)
                return (probs * dropout_multiplier(probs.shape, p, probs.dtype)) @ v
        return func(*args, **kwargs)


def _bind(args, kwargs, *names_defaults):
    return [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, default) in enumerate(names_defaults)]


def _on_cpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.is_nested

