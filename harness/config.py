"""Typed experiment config: YAML recipe + dotted `key=value` overrides, validated once.

    cfg = load_config("configs/bert_base_imdb.yaml", ["train.max_steps=20", "data.max_length=128"])

A recipe says *what* to train (model, data, hyperparameters). Hardware and parallelism
(number of processes, precision, DeepSpeed) live in the `accelerate launch` config only.
Every problem (unknown key, wrong type, impossible value) raises `BadInput` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from harness.errors import BadInput


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hub id, local folder, or `package:NAME` for a model shipped in an installed Python package."""
    num_labels: int = 2
    label_names: Optional[list[str]] = None
    """Names written to the saved model's id2label (default LABEL_0, LABEL_1, ...)."""
    attn_implementation: str = "sdpa"
    """`sdpa` or `eager`; falls back to eager for models without SDPA support."""
    attention_mask: str = "auto"
    """`4d`: harness hands SDPA a ready (batch, 1, 1, length) mask, so the model never inspects the padding
    on the host (transformers' `mask.all()` check is a GPU synchronisation in every forward); `2d`: the
    plain padding mask, as transformers expects by default; `auto`: 4d on GPUs and with
    train.compile_scope=layers, else 2d on CPUs (where there is no sync to save and the 2D path measured 3%
    faster)."""
    unpadded: bool = False
    """Compute on real tokens only: each batch's examples are packed into one row on the device, attention runs
    per example (FlashAttention's variable-length kernel on GPUs in bf16, no mask; nested jagged tensors on other
    GPUs; a loop of SDPA calls on CPUs), and no pad token is computed in any layer (batches are padded to their
    longest example only to carry them: data.pad_multiple does not apply). BERT-architecture models. With
    train.compile, the FlashAttention call is compiled with the layers (elsewhere attention runs eagerly between
    compiled parts); not with CUDA graphs (the packed length changes with every batch)."""
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    dataset: str = "stanfordnlp/imdb"
    """Hub id, local folder (train.* / test.* files or the aclImdb layout), local file, or `synthetic`."""
    dataset_config: Optional[str] = None
    """The hub dataset's configuration (its `name`), e.g. `mrpc` for `nyu-mll/glue`."""
    train_split: str = "train"
    eval_split: str = "test"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    """Second text of a sentence pair (e.g. `sentence2` for GLUE MRPC): the pair is tokenized together, with
    the model's segment ids, truncating the longer side first."""
    label_column: str = "label"
    max_length: int = 512
    truncation: str = "head"
    """`head` keeps the first max_length tokens; `head_tail` keeps the first quarter and the end of long texts
    (Sun et al., 2019: better on IMDb, where reviews often conclude at the end)."""
    train_samples: Optional[int] = None
    """Stratified, seeded subset of the training split (None: all of it)."""
    eval_samples: Optional[int] = None
    pad_multiple: Union[int, str] = "auto"
    """Pad each batch to a multiple of this many tokens. `auto`: 64 on GPUs (at most max_length/64 shapes,
    so attention plans, autotuning and compiled graphs are built once each), 8 on CPUs (least padding)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding); the order stays seeded."""
    num_workers: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    epochs: int = 3
    max_steps: Optional[int] = None
    """Optimizer steps; overrides epochs when set."""
    per_device_batch_size: int = 8
    eval_batch_size: Optional[int] = None
    """Per-device eval batch (default: 2 x per_device_batch_size)."""
    grad_accum_steps: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: float = 0
    """Optimizer steps of linear warmup; a value in (0, 1) is a fraction of the run."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 42
    eval_every: Union[int, str] = "epoch"
    """`epoch`, or every N optimizer steps."""
    log_every: int = 10
    overwrite: bool = False
    """Allow training into an output_dir that holds a run of another config (that run is removed)."""
    save_every: Optional[Union[int, str]] = None
    """Resumable checkpoint every N optimizer steps, or `epoch`; None: only when stopped by a signal."""
    keep_last: int = 2
    """Resumable checkpoints kept (the newest complete ones)."""
    best_metric: Optional[str] = None
    """Keep OUTPUT_DIR/best/ as the model of the best evaluation by this metric (accuracy, f1, precision, recall, loss)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations in a row without an improvement of train.best_metric by more than
    train.early_stopping_min_delta (needs train.best_metric); final/ then holds the best model."""
    early_stopping_min_delta: float = 0.0
    bf16_mode: str = "auto"
    """How a launch config's `mixed_precision: bf16` is run (one process or DDP): `autocast` (fp32 weights, the
    forward autocast to bf16) or `master_weights` (bf16 weights for the forward and backward, fp32 master
    weights and optimizer states; bf16 gradients, accumulated and all-reduced in bf16). `auto`: master_weights
    on GPUs (measured 1.27x autocast's samples/s at batch 128 on an H100), autocast on CPUs. DeepSpeed's bf16
    keeps fp32 masters of its own; FSDP2 follows its mixed-precision policy (`auto` leaves both to them)."""
    cpu_dropout: str = "fast"
    """How training forwards on CPUs draw dropout: `fast` (default): masks four at a time from 64-bit random
    numbers, and attention with dropout as matmul, softmax, mask, matmul instead of SDPA's math fallback
    (harness.modeling.FastCpuDropout; MiniLM on 2 cores: 1.71x the samples/s at max_length 512, 1.14x at
    64); `torch`: torch's own dropout and SDPA. The same probabilities (p to 1/65536), other random numbers.
    Not with train.compile, whose graphs draw their own; GPUs always use torch's (their kernels draw in place)."""
    compile: bool = False
    """torch.compile the model for training, in place (its parameter names, checkpoints and exports are the
    eager model's), as one graph whose batch size and padded length are symbolic (one compilation for every
    shape; `reduce-overhead` records a CUDA graph per shape); evaluation runs it eagerly. With
    data.pad_multiple=auto, batches are then padded to multiples of 64 on any device, so few shapes are compiled."""
    compile_scope: str = "model"
    """What train.compile compiles: `model` (one graph for the whole forward) or `layers` (each layer of the
    repeated stack in place, all sharing one graph: a fraction of the compile time; the rest runs eagerly)."""
    compile_mode: str = "default"
    """torch.compile mode with train.compile: `default`, `reduce-overhead` (CUDA graphs, one per padded length:
    fewer kernel-launch gaps at small batches), `max-autotune`, `max-autotune-no-cudagraphs`."""
    cuda_graphs: Union[bool, str] = "auto"
    """Capture each training step (forward, loss, backward, clipping, optimizer) as a CUDA graph, one per batch
    shape, and replay it (harness.graphs): one launch instead of thousands of operators from the host, which
    bounds small-batch GPU steps. One process on one GPU, train.grad_accum_steps 1, padded batches, SDPA with a
    4D mask; a shape's first 2 steps run eagerly. With train.compile the model is compiled in those steps and the
    graphs hold its kernels (not with the compile modes that record graphs of their own). `auto` (default): on
    wherever that holds, except a whole compiled model (its captures have not run on a GPU: `true` asks for
    them), and eager steps elsewhere, CPUs included (on a GPU it says why); an H100 measured 2.87x the eager
    steps' samples/s at batch 8. `true`: refused (exit 2) where it cannot apply; on CPUs the steps run eagerly.
    `false`: eager steps. A run may resume with another value."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for the MFU figure (built in for A100, H100, H200 in bf16)."""
    report_to: Union[str, list[str]] = "tensorboard"
    """Experiment trackers through Accelerate: `tensorboard`, `wandb`, `mlflow`, `comet_ml`, `aim`, `clearml`,
    `dvclive` (one or a list; each must be installed), or `none`. metrics.jsonl is always written."""
    sync_debug: bool = False
    """Count host-device synchronisations inside training steps and print the total at the end (CUDA only;
    torch.cuda.set_sync_debug_mode). A debugging aid: a step that waits for the GPU wastes it."""
    stall_timeout_s: Optional[float] = 900
    """Stall watchdog: a rank that makes no progress (no optimizer step, evaluation batch or checkpoint write)
    for this many seconds prints every thread's stack and exits 4, ending the job; the process group's
    collective timeout is set a minute beyond it. The first step gets three times as long (compilation).
    null: off (torch's default collective timeout then applies)."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint if any; `none`: refuse an existing run; or a checkpoint path."""

    @property
    def compile_records_graphs(self) -> bool:
        """train.compile in a mode that records CUDA graphs of its own (`reduce-overhead`, `max-autotune`)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from defaults when path is None) and apply `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise BadInput(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise BadInput(f"config file {path} must be a mapping of sections (model, data, train)")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    for section in raw:
        if section not in _SECTION_CLASSES:
            raise BadInput(f"unknown config section '{section}' (expected one of: {', '.join(_SECTION_CLASSES)})")
    built = {}
    for section, cls in _SECTION_CLASSES.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise BadInput(f"config section '{section}' must be a mapping, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise BadInput(f"unknown config key '{section}.{key}' (known keys: {', '.join(sorted(known))})")
            kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
        built[section] = cls(**kwargs)
    cfg = Config(**built)
    validate(cfg)
    return cfg


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise BadInput(f"override '{item}' must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1 or not all(key.split(".")):
        raise BadInput(f"override key '{key}' must be section.key (e.g. train.lr=3e-5)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string that YAML cannot parse, e.g. a path with ': '
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    section, name = key.split(".")
    if section not in _SECTION_CLASSES:
        raise BadInput(f"unknown config section '{section}' in override '{key}'")
    if not isinstance(raw.get(section) or {}, dict):
        raise BadInput(f"config section '{section}' must be a mapping")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][name] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except BadInput:
                errors.append(_type_name(arg))
        raise BadInput(f"config key {key}: expected {' or '.join(errors)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise BadInput(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise BadInput(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadInput(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise BadInput(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise BadInput(f"config key {key}: expected a non-empty string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} for {key}")


def validate(cfg: Config) -> None:
    """Impossible values, each named. Checks that need the data or world size live where those are known."""
    m, d, t = cfg.model, cfg.data, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise BadInput(msg)

    need(m.num_labels >= 2, f"model.num_labels must be at least 2, got {m.num_labels}")
    need(
        m.label_names is None or len(m.label_names) == m.num_labels,
        f"model.label_names has {len(m.label_names or [])} names but model.num_labels is {m.num_labels}",
    )
    need(m.attn_implementation in ("sdpa", "eager"), f"model.attn_implementation must be sdpa or eager, got {m.attn_implementation!r}")
    need(d.max_length >= 8, f"data.max_length must be at least 8, got {d.max_length}")
    for name in ("train_samples", "eval_samples"):
        v = getattr(d, name)
        need(v is None or v > 0, f"data.{name} must be positive, got {v}")
    need(d.truncation in ("head", "head_tail"), f"data.truncation must be head or head_tail, got {d.truncation!r}")
    need(d.text_pair_column is None or d.truncation == "head",
         "data.truncation=head_tail applies to single texts; sentence pairs (data.text_pair_column) are truncated "
         "from the longer side first: use data.truncation=head")
    need(d.text_pair_column != d.text_column, f"data.text_pair_column must differ from data.text_column ({d.text_column!r})")
    need(d.pad_multiple == "auto" or (isinstance(d.pad_multiple, int) and d.pad_multiple >= 1),
         f"data.pad_multiple must be 'auto' or a positive number of tokens, got {d.pad_multiple!r}")
    need(t.bf16_mode in ("auto", "autocast", "master_weights"),
         f"train.bf16_mode must be auto, autocast or master_weights, got {t.bf16_mode!r}")
    need(t.cpu_dropout in ("fast", "torch"), f"train.cpu_dropout must be fast or torch, got {t.cpu_dropout!r}")
    need(t.compile_scope in ("model", "layers"), f"train.compile_scope must be model or layers, got {t.compile_scope!r}")
    need(t.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
         f"train.compile_mode must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, got {t.compile_mode!r}")
    need(t.cuda_graphs in (True, False, "auto"), f"train.cuda_graphs must be auto, true or false, got {t.cuda_graphs!r}")
    need(m.attention_mask in ("auto", "4d", "2d"), f"model.attention_mask must be auto, 4d or 2d, got {m.attention_mask!r}")
    need(not (m.unpadded and t.compile_records_graphs),
         f"model.unpadded with train.compile_mode={t.compile_mode}: the packed length changes with every batch, and "
         f"a CUDA graph would be recorded for each; use compile_mode default or max-autotune-no-cudagraphs")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be at least 1, got {t.max_steps}")
    need(t.per_device_batch_size >= 1, f"train.per_device_batch_size must be at least 1, got {t.per_device_batch_size}")
    need(t.eval_batch_size is None or t.eval_batch_size >= 1, f"train.eval_batch_size must be at least 1, got {t.eval_batch_size}")
    need(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be at least 1, got {t.grad_accum_steps}")
    need(t.lr > 0, f"train.lr must be positive, got {t.lr}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(
        t.warmup_steps < 1 or float(t.warmup_steps).is_integer(),
        f"train.warmup_steps must be a whole number of steps or a fraction below 1, got {t.warmup_steps}",
    )
    need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}")
    need(t.peak_flops is None or t.peak_flops > 0, f"train.peak_flops must be positive, got {t.peak_flops}")
    need(t.stall_timeout_s is None or t.stall_timeout_s > 0,
         f"train.stall_timeout_s must be a positive number of seconds or null, got {t.stall_timeout_s}")
    need(t.log_every >= 1, f"train.log_every must be at least 1, got {t.log_every}")
    need(
        t.eval_every == "epoch" or (isinstance(t.eval_every, int) and t.eval_every >= 1),
        f"train.eval_every must be 'epoch' or a positive number of steps, got {t.eval_every!r}",
    )
    need(
        t.save_every is None or t.save_every == "epoch" or (isinstance(t.save_every, int) and t.save_every >= 1),
        f"train.save_every must be 'epoch', a positive number of steps or null, got {t.save_every!r}",
    )
    trackers = [t.report_to] if isinstance(t.report_to, str) else t.report_to
    unknown = [name for name in trackers if name not in TRACKERS and name != "none"]
    need(not unknown and (trackers == ["none"] or "none" not in trackers),
         f"train.report_to must be 'none' or among {', '.join(TRACKERS)}, got {t.report_to!r}")
    need(t.early_stopping_patience is None or t.early_stopping_patience >= 1,
         f"train.early_stopping_patience must be at least 1 (or null), got {t.early_stopping_patience}")
    need(t.early_stopping_patience is None or t.best_metric is not None,
         "train.early_stopping_patience needs train.best_metric (the metric it watches), e.g. train.best_metric=accuracy")
    need(t.early_stopping_min_delta >= 0, f"train.early_stopping_min_delta must be >= 0, got {t.early_stopping_min_delta}")
    need(t.keep_last >= 1, f"train.keep_last must be at least 1, got {t.keep_last}")
    need(
        t.best_metric is None or t.best_metric in METRICS,
        f"train.best_metric must be one of {', '.join(METRICS)}, got {t.best_metric!r}",
    )


# train.report_to -> the module that must be importable for it
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive"}

# The metrics an evaluation reports (harness.evaluation), each -> True when higher is better: train.best_metric's
# choices and the columns of `harness report`.
METRICS = {"accuracy": True, "f1": True, "precision": True, "recall": True, "loss": False}
