"""Tiny random classifiers of the architecture families users bring, each with a fitting tokenizer made with
`tokenizers` (word-level, over the synthetic data's words, with the family's own special tokens and template)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from harness.sources import synthetic_rows

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=128)
BERT_TOKENS = dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]")
ROBERTA_TOKENS = dict(bos="<s>", pad="<pad>", eos="</s>", unk="<unk>", mask="<mask>")  # pad id 1, as RoBERTa's
DECODER = dict(num_key_value_heads=1, tie_word_embeddings=False)


def _config(family: str, ids: dict):
    """The family's config, sized SMALL, with the tokenizer's special ids."""
    pad = ids.get("pad")
    return {
        "bert": lambda: T.BertConfig(**SMALL, pad_token_id=pad),
        "roberta": lambda: T.RobertaConfig(**SMALL, pad_token_id=pad, bos_token_id=ids["bos"], eos_token_id=ids["eos"]),
        "xlm-roberta": lambda: T.XLMRobertaConfig(**SMALL, pad_token_id=pad, bos_token_id=ids["bos"],
                                                  eos_token_id=ids["eos"]),
        "distilbert": lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                 max_position_embeddings=128, pad_token_id=pad),
        "electra": lambda: T.ElectraConfig(**SMALL, embedding_size=16, pad_token_id=pad),
        "albert": lambda: T.AlbertConfig(**SMALL, embedding_size=16, pad_token_id=pad),
        "deberta-v2": lambda: T.DebertaV2Config(**SMALL, pad_token_id=pad),
        # mean pooling, as the released checkpoints; layer 0 global, layer 1 a local window of 8 tokens
        "modernbert": lambda: T.ModernBertConfig(
            **SMALL, pad_token_id=pad, cls_token_id=ids["cls"], sep_token_id=ids["sep"], bos_token_id=ids["cls"],
            eos_token_id=ids["sep"], classifier_pooling="mean", local_attention=8, global_attn_every_n_layers=2),
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=ids["eos"],
                                     eos_token_id=ids["eos"], pad_token_id=None),
        "llama": lambda: T.LlamaConfig(**SMALL, **DECODER, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                       pad_token_id=None),
        "qwen2": lambda: T.Qwen2Config(**SMALL, **DECODER, bos_token_id=None, eos_token_id=ids["eos"],
                                       pad_token_id=pad),
    }[family]()


# special tokens, and the template around one text ($A) and a pair ($B): None for none
TEMPLATES = {
    "bert-like": (BERT_TOKENS, "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"),
    "roberta-like": (ROBERTA_TOKENS, "<s> $A </s>", "<s> $A </s> </s> $B </s>"),
    "gpt2": (dict(eos="<|endoftext|>"), None, None),  # no pad token, nothing added
    "llama": (dict(bos="<s>", eos="</s>", unk="<unk>"), "<s> $A", "<s> $A <s> $B"),  # no pad token
    "qwen2": (dict(eos="<|endoftext|>", pad="<|endoftext|>"), None, None),  # pads with its eos
}
KIND = {"roberta": "roberta-like", "xlm-roberta": "roberta-like", "gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2"}
FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "deberta-v2", "modernbert", "gpt2",
            "llama", "qwen2")


def tiny_family(family: str, out: Path, num_labels: int = 2) -> Path:
    """A random `family` classifier and its tokenizer saved to `out` (the same weights every time)."""
    specials, single, pair = TEMPLATES[KIND.get(family, "bert-like")]
    texts = synthetic_rows("train", 400)["text"]
    tokens = list(dict.fromkeys(specials.values()))
    if family in ("gpt2", "qwen2"):  # byte-level BPE, as theirs (transformers rebuilds Qwen2's from vocab and merges)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=tokens,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        vocab = tok.get_vocab()
    else:  # word-level over the data's words
        words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
        vocab = {}
        for token in [*tokens, *words]:
            vocab.setdefault(token, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk"]))
        tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    if single:
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in tokens])
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token", "cls": "cls_token",
             "sep": "sep_token", "mask": "mask_token"}
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128,
                                     **{names[k]: v for k, v in specials.items()})
    config = _config(family, {k: vocab[v] for k, v in specials.items()})
    config.vocab_size, config.num_labels = len(vocab), num_labels
    torch.manual_seed(0)
    T.AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out
