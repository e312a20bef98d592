import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from harness.config import DataConfig
from harness.data import Collator, StepBatchSampler, epoch_order, pad_multiple, stratified_indices, subset, tokenize
from harness.sources import load_split, synthetic_split
from harness.errors import BadInput
from tests.helpers import IMDB_SAMPLE


def test_subset_of_a_label_sorted_split_keeps_the_class_balance():
    labels = [0] * 600 + [1] * 400  # like IMDb on the hub: sorted by label
    ds = Dataset.from_dict({"text": [f"t{i}" for i in range(1000)], "label": labels})
    small = subset(ds, 200, "label", seed=3)
    assert Counter(small["label"]) == {0: 120, 1: 80}
    assert subset(ds, 200, "label", seed=3)["text"] == small["text"], "same seed, same subset"
    assert subset(ds, 200, "label", seed=4)["text"] != small["text"]
    assert Counter(subset(ds, 7, "label", seed=0)["label"]) == {0: 4, 1: 3}


def test_stratified_indices_are_distinct_and_cover_when_asked_for_everything():
    labels = [i % 3 for i in range(30)]
    idx = stratified_indices(labels, 10, seed=0)
    assert len(set(idx)) == 10
    assert stratified_indices(labels, 30, seed=0) == list(range(30))


def _all_batches(lengths, world, rank, accum=1, batch=4, epoch=0, position=0, seed=0, group=True):
    s = StepBatchSampler(lengths, batch, accum, world, rank, seed, group)
    s.set_epoch(epoch, position)
    return list(s)


def test_two_ranks_see_disjoint_examples_covering_the_training_set():
    lengths = np.random.default_rng(0).integers(5, 100, size=107)  # last step: 7 examples for 4 micro-batches
    r0 = _all_batches(lengths, 2, 0, accum=2, batch=5)
    r1 = _all_batches(lengths, 2, 1, accum=2, batch=5)
    seen0 = [i for b in r0 for i in b]
    seen1 = [i for b in r1 for i in b]
    assert len(r0) == len(r1) == 2 * 6, "same number of micro-batches, whole accumulation steps"
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == list(range(107)), "every example exactly once"
    assert all(1 <= len(b) <= 5 for b in r0 + r1)


def test_a_last_step_smaller_than_its_micro_batches_repeats_only_the_first_example():
    lengths = np.arange(101)  # 100 = 5 full steps of 20, then 1 example for 4 micro-batches
    batches = [b for r in (0, 1) for b in _all_batches(lengths, 2, r, accum=2, batch=5)]
    seen = Counter(i for b in batches for i in b)
    first = epoch_order(lengths, 0, 0, 64 * 5)[0]
    assert set(seen) == set(range(101))
    assert {i for i, c in seen.items() if c > 1} == {first}


def test_epoch_order_depends_on_seed_and_epoch_only():
    lengths = np.arange(300) % 37
    a = epoch_order(lengths, seed=1, epoch=0, group_size=64)
    assert np.array_equal(a, epoch_order(lengths, seed=1, epoch=0, group_size=64))
    assert not np.array_equal(a, epoch_order(lengths, seed=1, epoch=1, group_size=64))
    assert not np.array_equal(a, epoch_order(lengths, seed=2, epoch=0, group_size=64))
    assert sorted(a.tolist()) == list(range(300))


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(10, 512, size=2000)

    def padded(group):
        batches = _all_batches(lengths, 1, 0, batch=8, group=group)
        return sum(len(b) * max(lengths[b]) for b in batches)

    assert padded(True) < 0.7 * padded(False)


def test_resuming_on_another_world_size_continues_from_the_same_sample():
    lengths = np.random.default_rng(2).integers(5, 50, size=50)
    # 2 ranks x batch 4 consume 3 steps (24 samples), then 1 rank finishes the epoch.
    s0, s1 = (StepBatchSampler(lengths, 4, 1, 2, r, 9) for r in (0, 1))
    first = [i for s in (s0, s1) for b in list(s)[:3] for i in b]
    rest = [i for b in _all_batches(lengths, 1, 0, seed=9, position=24) for i in b]
    assert sorted(first + rest) == list(range(50))


def test_collator_pads_to_a_multiple_of_8():
    batch = Collator(pad_token_id=0)([{"input_ids": [5] * 3, "labels": 1}, {"input_ids": [7] * 10, "labels": 0}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 13
    assert batch["labels"].tolist() == [1, 0]


def test_synthetic_is_seeded_and_balanced():
    a, b = synthetic_split("train"), synthetic_split("train")
    assert a["text"] == b["text"] and len(a) == 4000
    assert Counter(a["label"]) == {0: 2000, 1: 2000}
    assert set(a["text"][:200]) != set(synthetic_split("test")["text"][:200])


def _write_split(folder, name, rows, fmt):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    return path


ROWS = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}, {"text": "fine", "label": 1}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_folder_of_split_files(tmp_path, fmt):
    _write_split(tmp_path, "train", ROWS, fmt)
    _write_split(tmp_path, "test", ROWS[:2], fmt)
    cfg = DataConfig(dataset=str(tmp_path))
    assert load_split(cfg, "train", None, 2)["label"] == [1, 0, 1]
    assert len(load_split(cfg, "test", None, 2)) == 2


def test_a_local_file_is_the_train_split_and_its_siblings_the_others(tmp_path):
    train = _write_split(tmp_path, "mytrain", ROWS, "jsonl")
    _write_split(tmp_path, "test", ROWS[:1], "jsonl")
    cfg = DataConfig(dataset=str(train))
    assert len(load_split(cfg, "train", None, 2)) == 3
    assert len(load_split(cfg, "test", None, 2)) == 1


def test_aclimdb_folder_layout(tmp_path):
    for split in ("train", "test"):
        for label, name in ((0, "neg"), (1, "pos")):
            d = tmp_path / "aclImdb" / split / name
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{i}_{7 if label else 2}.txt").write_text(f"{name} review {i}<br />")
    (tmp_path / "aclImdb" / "train" / "unsup").mkdir()
    (tmp_path / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("no label")
    ds = load_split(DataConfig(dataset=str(tmp_path / "aclImdb")), "train", None, 2)
    assert Counter(ds["label"]) == {0: 3, 1: 3}
    assert "no label" not in ds["text"]


@pytest.mark.skipif(not IMDB_SAMPLE.is_dir(), reason="../shared/data/imdb-sample is absent")
def test_the_shared_imdb_sample_loads_as_a_folder():
    cfg = DataConfig(dataset=str(IMDB_SAMPLE))
    assert len(load_split(cfg, "train", None, 2)) == 2000
    assert len(load_split(cfg, "test", None, 2)) == 1000


def test_string_labels_are_mapped_through_label_names(tmp_path):
    _write_split(tmp_path, "train", [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}], "jsonl")
    ds = load_split(DataConfig(dataset=str(tmp_path)), "train", ["negative", "positive"], 2)
    assert ds["label"] == [1, 0]


@pytest.mark.parametrize(
    "rows, cfg_kwargs, fragment",
    [
        ([{"review": "x", "label": 1}], {}, "data.text_column: column 'text' not in split 'train'"),
        ([{"text": "x", "stars": 1}], {}, "data.label_column: column 'label' not in split 'train'"),
        ([{"text": "x", "label": 1}, {"text": "y", "label": 2}], {}, "row 1: label 2 is outside [0, 2)"),
        ([{"text": "x", "label": -1}], {}, "row 0: label -1 is outside"),
        ([{"text": "x", "label": "great"}], {}, "label 'great' is not an id (set model.label_names to map names)"),
        ([{"text": "x", "label": 0.5}], {}, "row 0: label 0.5 is not a class id: for numeric targets set model.problem_type=regression"),
    ],
)
def test_bad_columns_and_labels_are_named(tmp_path, rows, cfg_kwargs, fragment):
    _write_split(tmp_path, "train", rows, "jsonl")
    with pytest.raises(BadInput) as e:
        load_split(DataConfig(dataset=str(tmp_path), **cfg_kwargs), "train", None, 2)
    assert fragment in str(e.value)


def test_missing_split_empty_split_and_missing_path(tmp_path):
    _write_split(tmp_path, "train", ROWS, "jsonl")
    with pytest.raises(BadInput, match="has no 'validation' split"):
        load_split(DataConfig(dataset=str(tmp_path)), "validation", None, 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.csv").write_text("text,label\n")
    with pytest.raises(BadInput, match="empty|cannot read"):
        load_split(DataConfig(dataset=str(tmp_path / "empty")), "train", None, 2)
    with pytest.raises(BadInput, match="path not found"):
        load_split(DataConfig(dataset=str(tmp_path / "missing")), "train", None, 2)
    with pytest.raises(BadInput, match="unsupervised"):
        load_split(DataConfig(dataset=str(tmp_path)), "unsupervised", None, 2)


def test_tokenize_truncates_and_records_lengths(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = Dataset.from_dict({"text": ["short", "word " * 100], "label": [0, 1]})
    out = tokenize(ds, tok, DataConfig(max_length=16))
    assert out["length"] == [3, 16] and out["full_length"] == [3, 102], "full_length: before truncation"
    assert set(out.column_names) == {"input_ids", "attention_mask", "labels", "length", "full_length"}
    # `head` is the tokenizer's own truncation of one sequence
    assert out["input_ids"] == tok(list(ds["text"]), truncation=True, max_length=16)["input_ids"]


def test_head_tail_truncation_keeps_the_start_and_the_end(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    words = " ".join(f"x{i}" for i in range(300))
    ds = Dataset.from_dict({"text": ["a short review", words], "label": [0, 1]})
    head = tokenize(ds, tok, DataConfig(max_length=32))
    both = tokenize(ds, tok, DataConfig(max_length=32, truncation="head_tail"))
    assert head[0]["input_ids"] == both[0]["input_ids"], "short texts are unchanged"
    ids = both[1]["input_ids"]
    assert len(ids) == 32 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    full = tok(words, add_special_tokens=False)["input_ids"]
    assert ids[1:8] == full[:7] and ids[8:-1] == full[-23:], "first quarter of the budget from the start, the rest from the end"


def test_padding_multiple_bounds_the_shapes_on_gpus_and_stays_small_on_cpus():
    assert pad_multiple("auto", compiled=False, on_gpu=True) == 64
    assert pad_multiple("auto", compiled=True, on_gpu=False) == 64
    assert pad_multiple("auto", compiled=False, on_gpu=False) == 8
    assert pad_multiple(16, compiled=True, on_gpu=True) == 16
    widths = {Collator(0, 64)([{"input_ids": [1] * n, "labels": 0}])["input_ids"].shape[1] for n in range(1, 513)}
    assert widths == {64 * k for k in range(1, 9)}, "at most max_length/64 shapes at max_length 512"
    # never past max_length: a multiple of 64 above it is pad tokens only, and can exceed the position embeddings
    widths = {Collator(0, 64, max_length=100)([{"input_ids": [1] * n, "labels": 0}])["input_ids"].shape[1] for n in range(1, 101)}
    assert widths == {64, 100}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_labels_as_users_store_them_become_ids_in_every_format(tmp_path, fmt):
    """Names (mapped through model.label_names), whole numbers stored as floats (as pandas writes them) and ids
    written as text, in every split and file format: Parquet and CSV give strings as large_string."""
    names = ["negative", "positive"]
    _write_split(tmp_path, "train", [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}], fmt)
    _write_split(tmp_path, "test", [{"text": "c", "label": "negative"}, {"text": "d", "label": "positive"}], fmt)
    cfg = DataConfig(dataset=str(tmp_path))
    assert load_split(cfg, "train", names, 2)["label"] == [1, 0]
    assert load_split(cfg, "test", names, 2)["label"] == [0, 1]
    floats = tmp_path / "floats"
    _write_split(floats, "train", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}], fmt)
    assert load_split(DataConfig(dataset=str(floats)), "train", None, 2)["label"] == [1, 0]
    with pytest.raises(BadInput, match=r"row 0: label 'neutral' is not one of model.label_names"):
        _write_split(tmp_path / "odd", "train", [{"text": "a", "label": "neutral"}], fmt)
        load_split(DataConfig(dataset=str(tmp_path / "odd")), "train", names, 2)


def test_tokenizing_long_texts_says_nothing_that_does_not_apply(tiny_model):
    """harness truncates after encoding: transformers' "Token indices sequence length is longer than the specified
    maximum" warning would be printed by every run on IMDb although no over-long sequence reaches the model."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    transformers_logging.get_logger().addHandler(handler)
    transformers_logging.set_verbosity_warning()  # the suite runs at error level; a user's run at warning
    try:
        tok = AutoTokenizer.from_pretrained(tiny_model)
        ds = tokenize(Dataset.from_dict({"text": ["word " * 700], "label": [0]}), tok, DataConfig(max_length=64))
        tok("word " * 700)  # the warning is shown once per tokenizer: it was not, and is not now
    finally:
        transformers_logging.set_verbosity_error()
        transformers_logging.get_logger().removeHandler(handler)
    assert ds["length"] == [64] and ds["full_length"] == [702]
    assert not [m for m in said if "Token indices sequence length" in m], said
