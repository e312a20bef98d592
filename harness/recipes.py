"""Reading recipes: a YAML file and dotted `key=value` overrides, typed and validated into a Config.

    cfg = load_config("configs/bert_base_imdb.yaml", ["train.max_steps=20", "data.max_length=128"])

Every problem (unknown key, wrong type, impossible value) raises `BadInput` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from harness.config import SECTIONS, Config, validate
from harness.errors import BadInput


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
        if section not in SECTIONS:
            raise BadInput(f"unknown config section '{section}' (expected one of: {', '.join(SECTIONS)})")
    built = {}
    for section, cls in SECTIONS.items():
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
    if section not in SECTIONS:
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
