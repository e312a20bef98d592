"""Data sources (`data.dataset`), loaded and checked: labels as ids in [0, num_labels), texts as strings.

- a hub id (default `stanfordnlp/imdb`); only the named splits are loaded, never IMDb's `unsupervised` (label -1);
- a local folder holding `<split>.parquet|csv|jsonl|json`, or the original `aclImdb/` layout
  (`<split>/pos/*.txt`, `<split>/neg/*.txt`); a local file is the train split and its siblings the others;
- `synthetic`: seeded sentiment sentences, for offline smoke runs.
"""

from __future__ import annotations

import codecs
import random
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import Dataset, load_dataset

from harness.config import DataConfig
from harness.errors import BadInput, first_line

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}


# ---------------------------------------------------------------- loading


def load_split(cfg: DataConfig, split: str, label_names: Optional[list[str]], num_labels: int,
               kind: str = "single_label") -> Dataset:
    """Load one split with its text and label columns validated, the labels as model.problem_type `kind` takes
    them (ids in [0, num_labels), 0/1 rows, or numbers)."""
    if cfg.dataset == "synthetic":
        ds = synthetic_split(split)
    else:
        ds = _load_source(cfg.dataset, split, cfg.dataset_config)
    return validate_columns(ds, cfg, split, label_names, num_labels, kind)


def _load_source(source: str, split: str, config_name: Optional[str] = None) -> Dataset:
    if split == "unsupervised":
        raise BadInput("the 'unsupervised' split has no labels (label -1); choose a labelled split")
    path = Path(source)
    split_path = Path(split)
    if split_path.suffix in FILE_BUILDERS and split_path.is_file():
        return _load_file(split_path)
    if path.is_dir():
        for ext in FILE_BUILDERS:
            f = path / f"{split}{ext}"
            if f.is_file():
                return _load_file(f)
        if (path / split / "pos").is_dir() or (path / split / "neg").is_dir():
            return load_aclimdb(path / split)
        raise BadInput(f"data.dataset folder {path} has no '{split}' split (expected {split}.parquet/.csv/.jsonl or {split}/pos and {split}/neg)")
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise BadInput(f"data.dataset file {path} must be .parquet, .csv, .jsonl or .json")
        if path.stem == split or split == "train":
            return _load_file(path)
        for ext in FILE_BUILDERS:
            f = path.parent / f"{split}{ext}"
            if f.is_file():
                return _load_file(f)
        raise BadInput(f"no '{split}' split beside data.dataset file {path} (expected {path.parent}/{split}.parquet or similar)")
    if source.startswith((".", "/", "~")) or source.endswith(tuple(FILE_BUILDERS)):
        raise BadInput(f"data.dataset path not found: {source}")
    try:
        return load_dataset(source, config_name, split=split)
    except Exception as e:  # hub errors come in many types; all mean "cannot use this dataset"
        named = f"'{source}' ({config_name})" if config_name else f"'{source}'"
        raise BadInput(f"cannot load dataset {named} split '{split}': {first_line(e)}") from None


def check_utf8(path: Path, what: str) -> None:
    """Text files must be UTF-8 throughout: arrow reads them lazily and would fail at the first bad row instead."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: e.start].count(b"\n")
                raise BadInput(f"{what} {path} line {line}: not UTF-8 text") from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise BadInput(f"{what} {path}: ends inside a UTF-8 character (cut short?)") from None


def _load_file(path: Path) -> Dataset:
    if path.suffix != ".parquet":
        check_utf8(path, "data file")
    try:
        return load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as e:
        raise BadInput(f"cannot read data file {path}: {first_line(e)}") from None


def load_aclimdb(split_dir: Path) -> Dataset:
    """The original aclImdb layout: <split>/pos/*.txt (label 1) and <split>/neg/*.txt (label 0); unsup/ ignored."""
    texts, labels = [], []
    for name, label in (("neg", 0), ("pos", 1)):
        for f in sorted((split_dir / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


_POS = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "excellent", "beautiful", "funny"]
_NEG = ["boring", "awful", "dull", "terrible", "clumsy", "tedious", "dreadful", "lifeless", "painful", "weak"]
_NOUNS = ["movie", "film", "plot", "acting", "script", "ending", "cast", "soundtrack", "story", "direction"]
_FILLER = ["honestly", "overall", "in the end", "from start to finish", "for the most part", "to my surprise", "as expected"]
_TEMPLATES = [
    "the {n} was {a}.",
    "{f}, the {n} felt {a} and the {n2} was {a2}.",
    "i thought the {n} was {a}, {f}.",
    "what a {a} {n}; the {n2} was {a2} too.",
    "{f} this is a {a} {n} with a {a2} {n2}.",
    "the {n} was not {o}, {f}.",  # negated opposite: the label needs more than one word
    "{f}, i would not call the {n} {o}; it was {a2}.",
]


def synthetic_split(split: str, size: Optional[int] = None) -> Dataset:
    return Dataset.from_dict(synthetic_rows(split, size))


def synthetic_rows(split: str, size: Optional[int] = None) -> dict:
    """Balanced, seeded sentiment sentences: the label is the polarity of the adjectives, flipped by "not".

    The train and test splits come from different seeds, so they share vocabulary but not sentences.
    """
    size = size or (4000 if split == "train" else 1000)
    rng = random.Random(f"harness-synthetic-{split}")
    texts, labels = [], []
    for i in range(size):
        label = i % 2
        adjs, opposite = (_POS, _NEG) if label else (_NEG, _POS)
        text = rng.choice(_TEMPLATES).format(
            n=rng.choice(_NOUNS), n2=rng.choice(_NOUNS), a=rng.choice(adjs), a2=rng.choice(adjs),
            o=rng.choice(opposite), f=rng.choice(_FILLER),
        )
        texts.append(text)
        labels.append(label)
    order = list(range(size))
    rng.shuffle(order)
    return {"text": [texts[i] for i in order], "label": [labels[i] for i in order]}


def label_id(value, label_names: Optional[list[str]], num_labels: int, where: str) -> int:
    """A label as users store it, as an id in [0, num_labels): an id, a whole number stored as a float (as pandas
    writes them), a name of model.label_names, or an id written as text."""
    names = {name: i for i, name in enumerate(label_names or [])}
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, (list, tuple, np.ndarray)):
        raise BadInput(f"{where}: label {_short(value)} is a list: for several labels per example set "
                       f"model.problem_type=multi_label")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, str):
        known = f"one of model.label_names {label_names}" if label_names else "an id (set model.label_names to map names)"
        raise BadInput(f"{where}: label {value!r} is not {known}")
    if isinstance(value, (float, np.floating)):
        raise BadInput(f"{where}: label {value!r} is not a class id: for numeric targets set "
                       f"model.problem_type=regression and model.num_labels=1")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < num_labels:
        raise BadInput(f"{where}: label {value!r} is outside [0, {num_labels}) (model.num_labels={num_labels})")
    return int(value)


def multi_hot(value, label_names: Optional[list[str]], num_labels: int, where: str) -> list[float]:
    """Multi-label labels as users store them, as a 0/1 row of num_labels: a list of ids or names, one id or name,
    or a 0/1 vector of exactly num_labels values (a list of that length holding only 0 and 1 is read as one)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and len(value) == num_labels and all(
            not isinstance(v, str) and v in (0, 1) for v in value):
        return [float(v) for v in value]
    row = [0.0] * num_labels
    for v in value if isinstance(value, (list, tuple)) else [value]:
        row[label_id(v, label_names, num_labels, where)] = 1.0
    return row


def target(value, where: str) -> float:
    """A regression target: a finite number, or one written as text."""
    try:
        number = float(value) if not isinstance(value, (bool, list, tuple, dict)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not np.isfinite(number):
        raise BadInput(f"{where}: label {_short(value)} is not a finite number (model.problem_type=regression)")
    return number


def _short(value) -> str:
    return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."


def labels_as(kind: str, values, label_names: Optional[list[str]], num_labels: int, split: str) -> list:
    """A split's labels as model.problem_type takes them: class ids, 0/1 rows, or numbers."""
    if kind == "regression":
        return [target(v, f"split '{split}' row {row}") for row, v in enumerate(values)]
    convert = multi_hot if kind == "multi_label" else label_id
    return [convert(v, label_names, num_labels, f"split '{split}' row {row}") for row, v in enumerate(values)]


def validate_columns(ds: Dataset, cfg: DataConfig, split: str, label_names: Optional[list[str]], num_labels: int,
                     kind: str = "single_label") -> Dataset:
    """Check the columns and labels; returns a dataset whose label column holds them as model.problem_type `kind`
    takes them (sources.labels_as)."""
    columns = [("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)]
    if cfg.text_pair_column:
        columns.append(("data.text_pair_column", cfg.text_pair_column))
    for key, col in columns:
        if col not in ds.column_names:
            raise BadInput(f"{key}: column '{col}' not in split '{split}' (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise BadInput(f"split '{split}' of {cfg.dataset} is empty")
    col = cfg.label_column
    ids = labels_as(kind, ds[col], label_names, num_labels, split)
    # a new column of ids, whatever the file stored (strings come as large_string from CSV and Parquet)
    ds = ds.remove_columns([col]).add_column(col, ids)
    for col in filter(None, (cfg.text_column, cfg.text_pair_column)):
        for row, t in enumerate(ds[col]):
            if not isinstance(t, str):
                raise BadInput(f"split '{split}' row {row}: text column '{col}' holds {type(t).__name__}, expected a string")
    return ds
