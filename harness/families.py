"""Model families as data: per architecture, which attention paths give the model's own logits, how it pools, where
its positions start, whether model.unpadded applies, and the pad-token rule; unknown architectures get the safe path.

tests/test_families.py builds a tiny random model of every family listed here and checks, for every mask choice
harness allows it, that training logits equal the model's own forward on padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from harness.config import ModelConfig
from harness.errors import BadInput


@dataclass(frozen=True)
class Family:
    name: str
    pooling: str
    """What the classifier reads, in words."""
    ready_mask: bool = False
    """SDPA with harness's (batch, 1, 1, length) padding mask computes what the model's own mask handling does: true
    only for plain bidirectional encoders (not local windows, causal decoders or anything unknown)."""
    base: Optional[str] = None
    """The base model's attribute for model.unpadded (BERT's embeddings and layers); None: not supported."""
    pooler: bool = False
    """model.unpadded: the first token goes through the base model's pooler before the classifier (BERT); else the
    classifier head reads the first token of the sequence itself (RoBERTa, ELECTRA)."""
    positions_after_pad: bool = False
    """Position ids start at pad_token_id + 1 (RoBERTa): max_position_embeddings counts pad_token_id + 1 unused."""
    decoder: bool = False
    """A causal decoder: pools the last token that is not padding, so its config must name the pad token."""


FAMILIES = {
    "bert": Family("BERT", "[CLS] through the pooler", ready_mask=True, base="bert", pooler=True),
    "roberta": Family("RoBERTa", "<s>", ready_mask=True, base="roberta", positions_after_pad=True),
    "xlm-roberta": Family("XLM-RoBERTa", "<s>", ready_mask=True, base="roberta", positions_after_pad=True),
    "electra": Family("ELECTRA", "[CLS]", ready_mask=True, base="electra"),
    "albert": Family("ALBERT", "[CLS] through the pooler", ready_mask=True),
    "distilbert": Family("DistilBERT", "[CLS]", ready_mask=True),
    "deberta-v2": Family("DeBERTa-v2/v3", "[CLS] through its context pooler"),  # relative attention, eager only
    "modernbert": Family("ModernBERT", "its classifier_pooling (cls or mean over real tokens)"),  # local windows
    # RoBERTa's relatives: positions start after the pad id; their masks are left to the model (not tested here)
    **{t: Family(t, "<s>", positions_after_pad=True)
       for t in ("xlm-roberta-xl", "camembert", "longformer", "data2vec-text", "mpnet", "ibert")},
}


def family_of(model_config) -> Family:
    """The family of a transformers config; an unknown architecture gets the model-owned mask and no packing, and is
    a decoder where transformers has it as a causal language model and not a masked one."""
    model_type = getattr(model_config, "model_type", None) or "unknown"
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return Family(model_type, "the last token that is not padding", decoder=True)
    return Family(model_type, "as the model does")


def mask_setting(configured: str, family: Family) -> str:
    """model.attention_mask for this family: `auto` stays auto where the ready mask is the model's own, and is
    the model's own 2D mask elsewhere."""
    return configured if configured != "auto" or family.ready_mask else "2d"


def check_choices(m: ModelConfig, family: Family) -> None:
    """Refuse what this family cannot do, before any tokenizing (train, plan)."""
    if m.attention_mask == "4d" and not family.ready_mask:
        raise BadInput(f"model.attention_mask=4d: {family.name} models handle their own attention mask ("
                       f"{'causal' if family.decoder else 'local windows, relative positions or unknown'}), which a "
                       f"ready padding mask would replace; set model.attention_mask=auto")
    if m.unpadded and family.base is None:
        supported = ", ".join(sorted({f.name for f in FAMILIES.values() if f.base}))
        raise BadInput(f"model.unpadded supports {supported} classifiers, not {family.name}: set model.unpadded=false")


def pad_token(tokenizer, configured: Optional[str]) -> Optional[str]:
    """model.pad_token for this tokenizer, set on it: the configured token (added to the vocabulary only if it is
    in it already), else the tokenizer's own, else its end-of-sequence token. Returns a line to say when the pad
    token is not the tokenizer's own; refuses a tokenizer that has neither."""
    if configured is not None:
        if tokenizer.convert_tokens_to_ids(configured) in (None, tokenizer.unk_token_id) and configured != tokenizer.unk_token:
            raise BadInput(f"model.pad_token={configured!r} is not in the tokenizer's vocabulary")
        if configured == tokenizer.pad_token:
            return None
        tokenizer.pad_token = configured
        return f"padding with {configured!r} (model.pad_token)"
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise BadInput("the tokenizer has no pad token and no end-of-sequence token to pad with: "
                       "set model.pad_token to a token of its vocabulary")
    tokenizer.pad_token = tokenizer.eos_token
    return f"padding with the end-of-sequence token {tokenizer.eos_token!r} (the tokenizer has no pad token; model.pad_token chooses)"
