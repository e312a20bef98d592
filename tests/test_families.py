"""Every architecture family harness knows, built tiny and random: training logits through every attention path
harness allows equal the model's own forward on each example alone (what `pipeline` runs), and what a family
cannot do is refused before any data is read."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from harness.attention import attention_mask_for, make_unpadded, mask_format
from harness.config import ModelConfig
from harness.data import Collator, pad_token_id
from harness.errors import BadInput
from harness.families import check_choices, family_of, pad_token
from harness.modeling import load_model, load_tokenizer
from harness.plan import describe, plan
from harness.recipes import load_config
from tests.families import FAMILIES, tiny_family
from tests.helpers import harness, ok, write_config

TEXTS = ["a wonderful film , the cast is great and the story never lets go " * 2,  # 30+ tokens: past the window
         "not a bad film at all",
         "terrible",
         "the plot is dull , the acting is poor , and the ending is worse"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_family(f, root / f) for f in FAMILIES}


def paths(family) -> list[tuple[str, str, bool]]:
    """(attention implementation, model.attention_mask, unpadded) for every choice harness allows this family,
    with `auto` resolved as on a GPU (the 4D mask where the family allows it)."""
    choices = [(attn, mask, False) for attn in ("sdpa", "eager") for mask in ("auto", "2d", "4d")
               if mask != "4d" or family.ready_mask]
    return choices + ([("sdpa", "2d", True)] if family.base else [])


@pytest.mark.parametrize("name", FAMILIES)
def test_training_logits_are_the_models_own_on_every_allowed_path(folders, name):
    folder = folders[name]
    tokenizer = load_tokenizer(str(folder))
    pad_token(tokenizer, None)  # decoders without one pad with their end-of-sequence token
    family = family_of(load_model(ModelConfig(name_or_path=str(folder), num_labels=2)).config)
    examples = [{"input_ids": ids, "labels": 0} for ids in tokenizer(TEXTS)["input_ids"]]
    assert max(len(e["input_ids"]) for e in examples) > 24, "padded batches longer than ModernBERT's window of 8"
    tried = []
    for attn, mask, unpadded in paths(family):
        cfg = ModelConfig(name_or_path=str(folder), num_labels=2, attn_implementation=attn, attention_mask=mask,
                          unpadded=unpadded)
        check_choices(cfg, family)
        model = load_model(cfg, pad_token_id=tokenizer.pad_token_id).eval()
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples])
        if unpadded:
            make_unpadded(model)
        batch = Collator(pad_token_id(tokenizer), multiple=8, unpadded=unpadded)(examples)
        fmt = mask_format(mask, family, torch.device("cuda"), no_host_check=False)
        batch["attention_mask"] = attention_mask_for(batch["attention_mask"], model.config._attn_implementation, fmt)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        assert (logits - alone).abs().max() < 1e-4, (name, attn, mask, unpadded, logits, alone)
        tried.append(fmt)
    assert ("4d" in tried) == family.ready_mask


def test_what_a_family_cannot_do_is_refused(folders):
    for name in FAMILIES:
        family = family_of(AutoConfig.from_pretrained(folders[name]))
        if not family.ready_mask:
            with pytest.raises(BadInput, match="model.attention_mask=4d: .* set model.attention_mask=auto"):
                check_choices(ModelConfig(attention_mask="4d"), family)
        if family.base is None:
            with pytest.raises(BadInput, match="model.unpadded supports .*BERT.* not "):
                check_choices(ModelConfig(unpadded=True), family)
    assert {n for n in FAMILIES if family_of(AutoConfig.from_pretrained(folders[n])).ready_mask} \
        == {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert"}


def test_a_decoder_without_a_pad_token_trains_evaluates_on_two_ranks_and_loads_in_pipeline(folders, tmp_path):
    """Llama's tokenizer ships no pad token: harness pads with its end-of-sequence token, says so, and saves both so
    that the classifier pools the last real token everywhere; `harness evaluate` on 2 ranks exits on both (its
    model is not wrapped for training, whose teardown could hang a rank), run twice."""
    from transformers import AutoConfig, AutoTokenizer, pipeline

    cfg = write_config(tmp_path / "llama.yaml", folders["llama"], tmp_path / "run", train={"lr": 3e-3})
    run = ok(harness("train", "--config", str(cfg)))
    assert "padding with the end-of-sequence token '</s>' (the tokenizer has no pad token" in run.stdout
    final = tmp_path / "run" / "final"
    eos = AutoTokenizer.from_pretrained(final).eos_token_id
    assert AutoConfig.from_pretrained(final).pad_token_id == eos == AutoTokenizer.from_pretrained(final).pad_token_id
    texts = ["a wonderful film , the cast is great", "terrible , a dull and poor plot"]
    out = ok(harness("predict", "--model", str(final), *texts)).stdout
    predicted = [(r["label"], r["score"]) for r in map(json.loads, out.splitlines())]
    classify = pipeline("text-classification", model=str(final), device="cpu")
    assert [(r["label"], pytest.approx(r["score"], abs=1e-5)) for r in classify(texts, batch_size=2)] == predicted
    for attempt in range(2):
        r = ok(harness("evaluate", "--model", str(final), "--output", str(tmp_path / f"eval{attempt}"), procs=2,
                       timeout=180))
        assert "evaluated 41 examples on 2 process(es)" in r.stderr


def test_plan_names_the_family_and_refuses_what_it_cannot_do(folders, tmp_path):
    gpt2 = load_config(None, [f"model.name_or_path={folders['gpt2']}", "data.dataset=synthetic",
                              "data.max_length=64", f"train.output_dir={tmp_path / 'run'}"])
    text = describe(gpt2, plan(gpt2))
    assert ("family          gpt2: pools the last token that is not padding; attention mask 2d (its own mask "
            "handling); padding with the end-of-sequence token '<|endoftext|>'") in text
    with pytest.raises(BadInput, match="model.attention_mask=4d: gpt2 models handle their own attention mask"):
        plan(load_config(None, [*OVERRIDES(gpt2), "model.attention_mask=4d"]))
    with pytest.raises(BadInput, match="model.unpadded supports .* not ModernBERT"):
        plan(load_config(None, [*OVERRIDES(gpt2), f"model.name_or_path={folders['modernbert']}", "model.unpadded=true"]))
    roberta = load_config(None, [*OVERRIDES(gpt2), f"model.name_or_path={folders['roberta']}", "model.unpadded=true"])
    assert "family          RoBERTa: pools <s>; attention mask auto; padding with '<pad>'" in describe(roberta, plan(roberta))


def OVERRIDES(cfg) -> list[str]:
    return [f"{s}.{k}={v}" for s, section in cfg.to_dict().items() for k, v in section.items()
            if k in ("name_or_path", "dataset", "max_length", "output_dir")]


def test_flash_attention_without_its_kernel_is_one_line_and_a_fallback_to_eager_is_said(folders, tmp_path):
    """CPUs (and GPUs without the flash-attn package) have no FlashAttention 2: refused before any data is read.
    DeBERTa has no SDPA attention: the run says it runs eager attention."""
    from harness.modeling import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("FlashAttention 2 is available here")
    cfg = load_config(None, [f"model.name_or_path={folders['modernbert']}", "data.dataset=synthetic",
                             "model.attn_implementation=flash_attention_2", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(BadInput, match="flash_attention_2 needs a CUDA GPU and the flash-attn package"):
        plan(cfg)
    said = []
    assert load_model(ModelConfig(name_or_path=str(folders["deberta-v2"])), warn=said.append).config._attn_implementation == "eager"
    assert said == ["harness: deberta-v2 has no sdpa attention: it runs eager attention"]
