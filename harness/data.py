"""Training and evaluation data: seeded stratified subsets, tokenization, padding per batch, and the batch order.

Training order (`StepBatchSampler`): one global permutation per epoch that depends only on the seed and
the epoch, never on the world size; examples are consumed in optimizer steps of
`per_device_batch x grad_accum x world_size`, so a position in the epoch is a number of samples and a run
can resume on another number of processes without skipping or repeating an example.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from harness.config import DataConfig
from harness.errors import BadInput
from harness.schedule import eval_batch_size, global_batch, steps_in_epoch
from harness.sources import load_split

def stratified_indices(labels: list[int], n: int, seed: int) -> list[int]:
    """A seeded subset of n indices keeping each class's share (largest remainder), sorted.

    IMDb's hub splits are sorted by label, so the first n rows would be a single class.
    """
    labels_arr = np.asarray(labels)
    if n >= len(labels_arr):
        return list(range(len(labels_arr)))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels_arr, return_counts=True)
    exact = counts * n / len(labels_arr)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    chosen = []
    for cls, k in zip(classes, take):
        idx = np.flatnonzero(labels_arr == cls)
        chosen.extend(rng.choice(idx, size=k, replace=False).tolist())
    return sorted(chosen)


def subset(ds: Dataset, n: Optional[int], label_column: str, seed: int) -> Dataset:
    """n examples, stratified by class where the labels are class ids, else (multi-label rows, regression
    targets) a seeded random n."""
    if n is None or n >= len(ds):
        return ds
    labels = ds[label_column]
    if all(isinstance(v, int) for v in labels):
        return ds.select(stratified_indices(labels, n, seed))
    return ds.select(sorted(np.random.default_rng(seed).choice(len(ds), size=n, replace=False).tolist()))


INDEX = "index"  # train.record_examples: an example's index in the training set
ROW = "__harness_row"  # the example's row in its split, before any subset: the `id` of harness evaluate's predictions


def tokenize(ds: Dataset, tokenizer, cfg: DataConfig) -> Dataset:
    """input_ids / attention_mask / labels / length, and for error analysis `row` (the example's row in its
    split, when build_split numbered them) and `full_length` (its token count before truncation); no padding
    here (the collator pads per batch).

    `head` keeps the first max_length tokens (with the model's special tokens); `head_tail` keeps the first
    quarter of the budget from the start of a long text and the rest from its end (128 + 382 tokens at
    max_length 512, Sun et al. 2019); shorter texts are unchanged.
    """
    # harness encodes whole texts and truncates them itself: transformers' warning that a text is longer than the
    # model takes (shown once, at the first one) does not apply
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if cfg.text_pair_column:
        return _tokenize_pairs(ds, tokenizer, cfg)
    text_col, label_col, max_length = cfg.text_column, cfg.label_column, cfg.max_length
    # The special tokens around one sequence ([CLS] ... [SEP] for BERT), read off an encoded sample.
    inner = tokenizer("a", add_special_tokens=False)["input_ids"]
    outer = tokenizer("a")["input_ids"]
    at = next(i for i in range(len(outer)) if outer[i : i + len(inner)] == inner)
    prefix, suffix = outer[:at], outer[at + len(inner) :]
    budget = max_length - len(prefix) - len(suffix)
    head = budget // 4 if cfg.truncation == "head_tail" else budget  # `head`: all of the budget, no tail
    if cfg.truncation == "chunks" and not 0 <= cfg.chunk_overlap < budget:
        raise BadInput(f"data.chunk_overlap={cfg.chunk_overlap} must be below the {budget} text tokens a window of "
                       f"data.max_length={max_length} holds")

    if cfg.truncation == "chunks" and ROW not in ds.column_names:  # each window names its document by its row
        ds = ds.add_column(ROW, list(range(len(ds))))

    def encode(batch):
        pieces = tokenizer(batch[text_col], add_special_tokens=False, return_attention_mask=False,
                           return_token_type_ids=False)["input_ids"]
        if cfg.truncation == "chunks":
            return _windows(batch, pieces, prefix, suffix, budget, cfg.chunk_overlap, label_col)
        ids = [prefix + (p if len(p) <= budget else p[:head] + p[len(p) - (budget - head) :]) + suffix for p in pieces]
        enc = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": batch[label_col],
               "length": [len(i) for i in ids], "full_length": [len(p) + len(prefix) + len(suffix) for p in pieces]}
        if ROW in batch:
            enc["row"] = batch[ROW]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")


def _windows(batch: dict, pieces: list, prefix: list, suffix: list, budget: int, overlap: int, label_col: str) -> dict:
    """data.truncation=chunks: each text as windows of `budget` tokens, each sharing `overlap` tokens with the one
    before and wrapped in the model's special tokens; every window carries its document (`doc`, its row) and label.
    A short text is one window."""
    enc = {k: [] for k in ("input_ids", "labels", "length", "full_length", "row", "doc")}
    stride = budget - overlap
    for i, p in enumerate(pieces):
        starts = range(0, max(1, len(p) - overlap), stride) if len(p) > budget else [0]
        for start in starts:
            ids = prefix + p[start : start + budget] + suffix
            enc["input_ids"].append(ids)
            enc["labels"].append(batch[label_col][i])
            enc["length"].append(len(ids))
            enc["full_length"].append(len(p) + len(prefix) + len(suffix))
            enc["row"].append(batch[ROW][i])
            enc["doc"].append(enc["row"][-1])
    enc["attention_mask"] = [[1] * len(i) for i in enc["input_ids"]]
    return enc


def _tokenize_pairs(ds: Dataset, tokenizer, cfg: DataConfig) -> Dataset:
    """Sentence pairs with the model's own pair template and segment ids (`token_type_ids`, where the model
    has them); truncation `longest_first` takes tokens from the longer text first."""
    first, second = cfg.text_column, cfg.text_pair_column
    segments = "token_type_ids" in tokenizer.model_input_names

    def encode(batch):
        enc = dict(tokenizer(batch[first], batch[second], truncation="longest_first", max_length=cfg.max_length,
                             return_token_type_ids=segments))
        whole = tokenizer(batch[first], batch[second], return_attention_mask=False, return_token_type_ids=False)
        enc["labels"] = batch[cfg.label_column]
        enc["length"] = [len(i) for i in enc["input_ids"]]
        enc["full_length"] = [len(i) for i in whole["input_ids"]]
        if ROW in batch:
            enc["row"] = batch[ROW]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing pairs")


def build_split(cfg: DataConfig, split: str, tokenizer, n: Optional[int], seed: int, label_names, num_labels: int,
                keep_text: bool = False, kind: str = "single_label") -> Dataset:
    """One split, validated, subset and tokenized; each example keeps its row in the split (`row`), and with
    `keep_text` its text's first 200 characters (`text`), for error analysis."""
    ds = load_split(cfg, split, label_names, num_labels, kind)
    ds = ds.add_column(ROW, list(range(len(ds))))
    ds = subset(ds, n, cfg.label_column, seed)
    tokenized = tokenize(ds, tokenizer, cfg)
    if keep_text:
        texts = ds[cfg.text_column] if not cfg.text_pair_column else [
            f"{a} [PAIR] {b}" for a, b in zip(ds[cfg.text_column], ds[cfg.text_pair_column])]
        head = {row: t[:200] for row, t in zip(ds[ROW], texts)}  # by row: a text's windows share it
        tokenized = tokenized.add_column("text", [head[row] for row in tokenized["row"]])
    return tokenized


def size(ds: Dataset) -> str:
    """A tokenized split's size in words: its examples, and with data.truncation=chunks the texts they are windows of."""
    if "doc" not in ds.column_names:
        return f"{len(ds)} examples"
    return f"{len(ds)} examples (windows of {len(set(ds['doc']))} texts)"


def pad_token_id(tokenizer) -> int:
    """What batches are padded with: the tokenizer's pad token, else 0 (the mask hides it either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# What a batch hands the model (the rest, labels and per-example records, stays with the loop and the metrics):
# token_index and offsets carry model.unpadded's packing (Collator(unpadded=True)).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "token_index", "offsets")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def pad_multiple(configured, compiled: bool, on_gpu: bool) -> int:
    """`data.pad_multiple`: 64 where shapes are costly (GPUs, compiled models), 8 elsewhere (least padding)."""
    if configured != "auto":
        return int(configured)
    return 64 if (on_gpu or compiled) else 8


class Collator:
    """Pads each batch to its own longest example, rounded up to a multiple of `multiple` (8 or 64), and never
    past `max_length` (a multiple of 64 above it would compute on pad tokens only, and can exceed the model's
    position embeddings).

    `unpadded` (model.unpadded): padded to the longest example exactly, and the batch also carries where its real
    tokens are: `token_index`, their positions in the flattened (examples x width) batch, and `offsets`, the
    cumulative lengths (examples + 1), from which the model packs the real tokens on the device."""

    def __init__(self, pad_token_id: int, multiple: int = 8, extras: tuple[str, ...] = (), max_length: Optional[int] = None,
                 unpadded: bool = False):
        self.pad_token_id = pad_token_id
        self.multiple = 1 if unpadded else multiple
        self.max_length = max_length
        self.extras = extras  # per-example integer columns passed through as tensors (row, length, ...)
        self.unpadded = unpadded

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        width = int(math.ceil(longest / self.multiple) * self.multiple)
        if self.max_length is not None:
            width = max(longest, min(width, self.max_length))
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            mask[i, :n] = 1
        # class ids as int64; multi-label 0/1 rows and regression targets as float32
        labels = torch.tensor([e["labels"] for e in examples])
        labels = labels.long() if not labels.is_floating_point() else labels.float()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "token_type_ids" in examples[0]:  # sentence pairs: segment ids, padded with 0
            segments = torch.zeros((len(examples), width), dtype=torch.long)
            for i, e in enumerate(examples):
                segments[i, : len(e["token_type_ids"])] = torch.as_tensor(e["token_type_ids"])
            batch["token_type_ids"] = segments
        if "doc" in examples[0]:  # data.truncation=chunks: which document each window belongs to
            batch["doc"] = torch.as_tensor([int(e["doc"]) for e in examples], dtype=torch.long)
        for key in self.extras:
            batch[key] = torch.as_tensor([int(e[key]) for e in examples], dtype=torch.long)
        if self.unpadded:
            batch["token_index"] = mask.flatten().nonzero().flatten()
            batch["offsets"] = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0))
        return batch


# ---------------------------------------------------------------- training order


def epoch_order(lengths: np.ndarray, seed: int, epoch: int, group_size: Optional[int]) -> np.ndarray:
    """The global order of one epoch: a seeded permutation, sorted by length (longest first) inside
    consecutive groups of `group_size` so that neighbouring examples, hence batches, pad little."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    if not group_size:
        return perm
    groups = [perm[i : i + group_size] for i in range(0, len(perm), group_size)]
    return np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in groups])


class StepBatchSampler:
    """This rank's micro-batches, `grad_accum` per optimizer step, for one epoch at a time.

    Step s of an epoch consumes the next `global_batch = batch_size * grad_accum * world_size` examples of
    `epoch_order`; they are cut into grad_accum x world_size contiguous micro-batches, and micro-batch
    (a, r) goes to rank r as its a-th. The last step of an epoch is split evenly the same way, so every
    step has exactly grad_accum micro-batches on every rank (Accelerate's and DeepSpeed's accumulation
    boundaries cannot drift apart). Only when that last step has fewer examples than micro-batches does
    a micro-batch repeat the epoch's first example.
    """

    def __init__(self, lengths, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 group_by_length: bool = True, units: Optional[list[list[int]]] = None):
        # `units`: examples that always go together (train.chunk_loss=documents: a text's windows), one list of
        # indices each; batch sizes, positions and epochs then count units, and a unit's length is its tokens
        self.units = units
        if units is not None:
            lengths = [sum(lengths[i] for i in unit) for unit in units]
        self.lengths = np.asarray(lengths)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.group_size = 64 * batch_size if group_by_length else None
        self.epoch = 0
        self.position = 0  # samples of this epoch already consumed, by all ranks together

    @property
    def epoch_size(self) -> int:
        """Examples (or units) in an epoch: what positions and steps count."""
        return len(self.lengths)

    @property
    def global_batch(self) -> int:
        return global_batch(self.batch_size, self.grad_accum, self.world_size)

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def steps(self) -> int:
        return steps_in_epoch(len(self.lengths), self.global_batch, self.position)

    def __len__(self) -> int:
        return self.steps() * self.grad_accum

    def step_batches(self, order: np.ndarray, start: int) -> list[list[int]]:
        """The grad_accum micro-batches of this rank for the step that starts at `start`."""
        chunk = order[start : start + self.global_batch]
        parts = self.grad_accum * self.world_size
        sizes = [len(chunk) // parts + (1 if i < len(chunk) % parts else 0) for i in range(parts)]
        bounds = np.cumsum([0] + sizes)
        mine = []
        for a in range(self.grad_accum):
            i = a * self.world_size + self.rank
            part = chunk[bounds[i] : bounds[i + 1]].tolist() or [int(order[0])]
            mine.append(part if self.units is None else [j for unit in part for j in self.units[unit]])
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.lengths, self.seed, self.epoch, self.group_size)
        for start in range(self.position, len(order), self.global_batch):
            yield from self.step_batches(order, start)


def training_data(cfg, tokenizer, accelerator):
    """(train set, eval set, this rank's sampler, train loader, eval loader) for a run of `cfg`.

    Each node's first process tokenizes and fills the datasets cache; the others then read it.
    """
    t, d, m = cfg.train, cfg.data, cfg.model
    with accelerator.local_main_process_first():
        train_ds = build_split(d, d.train_split, tokenizer, d.train_samples, t.seed, m.label_names, m.num_labels,
                               kind=m.problem_type)
        eval_ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, t.seed, m.label_names, m.num_labels,
                              kind=m.problem_type)
    # Each new padded length costs attention plans and compiled graphs on GPUs: few lengths there.
    multiple = pad_multiple(d.pad_multiple, t.compile, accelerator.device.type == "cuda")
    collate = Collator(pad_token_id(tokenizer), multiple, max_length=d.max_length, unpadded=m.unpadded)
    train_collate = collate
    if t.record_examples:  # each example's index travels with it, so the loop logs what it was given
        train_ds = train_ds.add_column(INDEX, list(range(len(train_ds))))
        train_collate = Collator(pad_token_id(tokenizer), multiple, extras=(INDEX,), max_length=d.max_length,
                                 unpadded=m.unpadded)
    units = None  # train.chunk_loss=documents: a text's windows (consecutive rows) are one unit of the sampler
    if t.chunk_loss == "documents":
        units = [list(rows) for _, rows in itertools.groupby(range(len(train_ds)), key=list(train_ds["doc"]).__getitem__)]
    sampler = StepBatchSampler(train_ds["length"], t.per_device_batch_size, t.grad_accum_steps,
                               accelerator.num_processes, accelerator.process_index, t.seed, d.group_by_length, units)
    # Not passed to prepare(): the sampler already gives each rank its own batches. The loaders get their
    # own generators so that starting one never draws from the global RNG (dropout) stream: resumed
    # runs then see exactly the random numbers of an uninterrupted one.
    train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=train_collate, num_workers=d.num_workers,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    eval_dl = eval_dataloader(eval_ds, eval_batch_size(t), collate, d.num_workers)
    return train_ds, eval_ds, sampler, train_dl, eval_dl


def eval_dataloader(dataset, batch_size: int, collate_fn, num_workers: int = 0) -> DataLoader:
    """Longest examples first (little padding, and an out-of-memory shows at once); the order is fixed."""
    lengths = dataset["length"]
    ordered = dataset.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    # Its own generator: starting an epoch of it must not draw from the global RNG (training's dropout stream).
    return DataLoader(ordered, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers,
                      generator=torch.Generator())
