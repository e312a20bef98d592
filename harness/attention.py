"""Attention paths: the ready 4D padding mask, and model.unpadded's packed attention over real tokens only."""

from __future__ import annotations

import functools
from types import MethodType

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_outputs import SequenceClassifierOutput

from harness.config import ModelConfig
from harness.families import Family, check_choices, family_of, mask_setting


def mask_format(configured: str, family: Family, device: torch.device, no_host_check: bool) -> str:
    """model.attention_mask resolved for this run: the model's own 2D mask for families that handle their own
    (families.mask_setting); else `auto` is 4d on GPUs (transformers' check of a 2D mask is a
    host sync in every forward) and where `no_host_check` (layers compiled apart, steps captured as CUDA graphs:
    a host check would give a batch without padding no mask and a second graph), 2d elsewhere."""
    configured = mask_setting(configured, family)
    if configured != "auto":
        return configured
    return "4d" if device.type == "cuda" or no_host_check else "2d"


def attention_mask_for(mask: torch.Tensor, attn_implementation: str, fmt: str) -> torch.Tensor:
    """The padding mask as the model's attention takes it: a (batch, 1, 1, length) boolean mask (True = attend)
    for SDPA with fmt `4d`, built on the device; the 2D mask otherwise (eager attention builds its own)."""
    if fmt == "2d" or attn_implementation != "sdpa":
        return mask
    return mask[:, None, None, :].bool()


UNPADDED = "harness_unpadded"  # the attention implementation of model.unpadded, registered with transformers


def unpadded_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                       offsets=None, max_seqlen=None, **kwargs):
    """transformers' attention interface for model.unpadded (the mask is None: offsets say where examples are).
    Under train.compile the FlashAttention call is traced with the layer (torch's compiler has it as an operator:
    one graph per layer, none broken around the attention); the other kernels run eagerly between compiled parts
    (`runs` reads the offsets on the host, `jagged` builds nested tensors)."""
    kernel = packed_kernel(query)
    attend = packed_attention if kernel == "flash" else _packed_attention_eagerly
    return attend(query, key, value, offsets, max_seqlen, dropout, scaling, kernel=kernel), None


def packed_kernel(query: torch.Tensor) -> str:
    """The kernel packed_attention runs for these inputs: `flash` on GPUs that have FlashAttention (compute
    capability 8 or more) with bf16 or fp16 inputs, `jagged` on other GPUs and in fp32, `runs` on CPUs."""
    if query.device.type != "cuda":
        return "runs"
    if (query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and _flash_available(query.device.index)):
        return "flash"
    return "jagged"


@torch.compiler.assume_constant_result  # a compiled layer asks it once, when traced, and keeps the answer
def _flash_available(device_index) -> bool:
    return torch.backends.cuda.flash_sdp_enabled() and _has_flash_attention(device_index)


@functools.lru_cache(maxsize=None)
def _has_flash_attention(device_index) -> bool:  # asked by every layer of every step: once per device
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def flash_varlen(query, key, value, cu_seqlens, max_seqlen: int, dropout: float, scale):
    """FlashAttention's variable-length kernel, as torch's nested-tensor SDPA calls it (and its autograd formula
    with it, attention dropout included): (tokens, heads, head size) inputs, int32 cumulative lengths."""
    return torch.ops.aten._flash_attention_forward(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                   dropout, False, False, scale=scale)[0]


def packed_attention(query, key, value, offsets, max_seqlen: int, dropout: float = 0.0, scale=None,
                     kernel: str = "jagged"):
    """Attention over packed examples: query, key and value are (1, heads, tokens, head size), the real tokens of
    the batch's examples one after the other; `offsets` (examples + 1) says where each example starts. Returns
    (1, tokens, heads, head size), as transformers' attention functions do. Each example attends to itself only,
    without a mask. `max_seqlen` (the longest example) is known on the host, so no kernel reads lengths back from
    the device (a host sync). The kernels (packed_kernel chooses):
    - `flash` (GPUs, bf16): FlashAttention's variable-length kernel called directly (attention dropout included),
      because through nested tensors the same kernel costs milliseconds of host time per call;
    - `jagged`: SDPA on nested jagged tensors (GPUs without FlashAttention, fp32), given a lower bound of 1 token;
    - `runs` (CPUs, where torch's nested kernel is the slow math one): one SDPA call per run of
      consecutive examples of the same length (a length-grouped batch truncated at max_length is one call)."""
    if kernel == "flash":
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # no copies: views of Linears
        return flash_varlen(q, k, v, offsets.to(torch.int32), max_seqlen, dropout, scale)[None]
    if kernel == "runs":
        bounds = offsets.tolist()  # on the host already
        runs, outs = [], []  # (first token, examples, length) of each run of equal lengths
        for a, b in zip(bounds, bounds[1:]):
            if runs and runs[-1][2] == b - a:
                runs[-1][1] += 1
            else:
                runs.append([a, 1, b - a])
        for a, k, n in runs:  # (1, heads, k * n, size) -> (k, heads, n, size) -> SDPA -> back
            q, kk, v = (x[0, :, a:a + k * n].unflatten(1, (k, n)).transpose(0, 1) for x in (query, key, value))
            out = nn.functional.scaled_dot_product_attention(q, kk, v, dropout_p=dropout, scale=scale)
            outs.append(out.transpose(0, 1).flatten(1, 2))
        return torch.cat(outs, dim=1)[None].transpose(1, 2)

    def nested(x):  # (1, heads, tokens, head size) -> (examples, heads, ragged length, head size)
        values = x[0].transpose(0, 1).contiguous()  # a no-op for transformers' layers: a view of a Linear's output
        return torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=1, max_seqlen=max_seqlen).transpose(1, 2)

    out = nn.functional.scaled_dot_product_attention(nested(query), nested(key), nested(value), dropout_p=dropout,
                                                     scale=scale)
    return out.transpose(1, 2).values()[None]


_packed_attention_eagerly = torch.compiler.disable(packed_attention)  # compiled layers break their graph around it


def make_unpadded(model: nn.Module) -> None:
    """model.unpadded: the classifier computes on real tokens only. Batches carry, beside the padded `input_ids`,
    `token_index` (where the real tokens are in the flattened batch) and `offsets` (Collator(unpadded=True));
    the forward gathers the real tokens into one packed row (positions restart in every example, after the pad id
    where the family's do), runs transformers' own embeddings and layers on it with `unpadded_attention`, and
    classifies each example's first token as the model's own head does. No padding is computed, and no mask: the
    gathers are on the device, with no host synchronisation. The modules and weights are the model's own, so
    checkpoints and exports are unchanged."""
    family = family_of(model.config)
    check_choices(ModelConfig(unpadded=True), family)
    AttentionInterface.register(UNPADDED, unpadded_attention)
    model.config._attn_implementation = UNPADDED  # what the layers look up; the forward below builds no mask
    first_position = model.config.pad_token_id + 1 if family.positions_after_pad else 0
    model.forward = MethodType(functools.partial(_unpadded_forward, base=family.base, pooler=family.pooler,
                                                 first_position=first_position), model)


def _unpadded_forward(self, input_ids, token_index, offsets, token_type_ids=None, *, base: str, pooler: bool,
                      first_position: int, **ignored):
    encoder = getattr(self, base)
    width = input_ids.shape[1]  # the batch's longest example: the collator pads to it exactly
    ids = input_ids.flatten()[token_index][None]
    positions = (token_index % width)[None] + first_position
    types = token_type_ids.flatten()[token_index][None] if token_type_ids is not None else torch.zeros_like(ids)
    hidden = encoder.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions)
    if hasattr(encoder, "embeddings_project"):  # ELECTRA with embeddings narrower than its layers
        hidden = encoder.embeddings_project(hidden)
    hidden = encoder.encoder(hidden, offsets=offsets, max_seqlen=width).last_hidden_state
    first = hidden[0, offsets[:-1]][:, None]  # each example's first token ([CLS], <s>)
    if pooler:
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(encoder.pooler(first))))
    return SequenceClassifierOutput(logits=self.classifier(first))  # a head that reads the first token itself
