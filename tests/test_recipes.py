"""Recipes and overrides read into a Config: any value, however hostile, is a Config or one BadInput line."""

import dataclasses
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import SECTIONS
from harness.errors import BadInput
from harness.inference import read_jsonl_texts
from harness.recipes import load_config, read_yaml
from harness.sources import load_split
from harness.config import DataConfig

KEYS = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["auto", "epoch", "4d", "head_tail", "fast", "none", "synthetic", ".inf", "-1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                              max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_of_any_key_is_a_config_or_one_bad_input_line(key, value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    try:
        cfg = load_config(None, [f"{key}={text}"])
    except BadInput as e:
        assert "\n" not in str(e) and len(str(e)) < 2000
    else:
        assert dataclasses.is_dataclass(cfg)


@settings(max_examples=150, deadline=None)
@given(recipe=st.dictionaries(st.sampled_from(["model", "data", "train", "other"]), VALUES, max_size=3))
def test_any_recipe_file_is_a_config_or_one_bad_input_line(tmp_path_factory, recipe):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        load_config(path)
    except BadInput as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_in_a_data_file_or_a_predict_input_are_read_or_refused_in_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.jsonl").write_bytes(data)
    try:
        ds = load_split(DataConfig(dataset=str(folder)), "train", None, 2)
        assert all(isinstance(t, str) for t in ds["text"])
    except BadInput as e:
        assert "\n" not in str(e)
    try:
        texts = read_jsonl_texts(folder / "train.jsonl")
        assert all(isinstance(t, (str, tuple)) for t in texts)
    except BadInput as e:
        assert "\n" not in str(e)


def test_yaml_that_would_exhaust_memory_or_the_stack_is_refused_before_it_is_built(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi"))
    with pytest.raises(BadInput, match=r"config file .* expands to more than 100000 values"):
        (tmp_path / "bomb.yaml").write_text(bomb)
        load_config(tmp_path / "bomb.yaml")
    with pytest.raises(BadInput, match="nests deeper than 32 levels"):
        read_yaml("a: " + "[" * 5000 + "]" * 5000, "recipe")
    with pytest.raises(BadInput, match="is 1048577 bytes"):
        read_yaml("#" * (1 << 20) + "\n", "recipe")
    (tmp_path / "latin1.yaml").write_bytes("train: {output_dir: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(BadInput, match=r"latin1.yaml is not UTF-8 text \(byte 23\)"):
        load_config(tmp_path / "latin1.yaml")
    assert read_yaml("a: &x [1, 2]\nb: *x\n", "ok") == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize("override, fragment", [
    ("train.seed=-1", "train.seed must be at least 0"),
    ("train.seed=4294967296", "train.seed must be below 2**32"),
    ("train.stall_timeout_s=.inf", "train.stall_timeout_s must be positive and finite"),
    ("train.lr=.inf", "train.lr must be positive and finite"),
    ("train.weight_decay=.nan", "train.weight_decay must be at least 0"),
    ("model.label_names=[a, a]", "model.label_names names a label twice"),
])
def test_values_plan_once_accepted_are_refused(override, fragment):
    with pytest.raises(BadInput, match=fragment.replace("*", r"\*")):
        load_config(None, [override] + (["model.num_labels=2"] if "label_names" in override else []))


def test_a_non_utf8_data_file_and_predict_input_are_one_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(BadInput, match=r"data file .*train.jsonl line 2: not UTF-8 text"):
        load_split(DataConfig(dataset=str(tmp_path)), "train", None, 2)
    with pytest.raises(BadInput, match=r"train.jsonl line 2: not UTF-8 text"):
        read_jsonl_texts(tmp_path / "train.jsonl")
    assert json.loads('{"ok": 1}')
