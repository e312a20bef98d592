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
from harness.errors import BadInput, first_line


# Bounds on any YAML harness reads (recipes, run folders' config.yaml, launch configs): a file written by hand
# or by someone else must not exhaust memory or the stack before it is validated.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000  # counted with every alias expanded


def read_yaml(text: str, what: str):
    """yaml.safe_load of `text`, refused (BadInput naming `what`) when it is larger, deeper or, aliases expanded,
    bigger than the bounds; the bounds are checked on the event stream, before anything is built."""
    if len(text) > MAX_YAML_BYTES:
        raise BadInput(f"{what} is {len(text)} bytes, more than a config takes ({MAX_YAML_BYTES})")
    sizes: dict[str, int] = {}
    stack = [[0, None]]  # per open collection: nodes so far, its anchor
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([1, event.anchor])
            if len(stack) > MAX_YAML_DEPTH:
                raise BadInput(f"{what} nests deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            count, anchor = stack.pop()
            stack[-1][0] += count
            if anchor:
                sizes[anchor] = count
        elif isinstance(event, yaml.ScalarEvent):
            stack[-1][0] += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            stack[-1][0] += sizes.get(event.anchor, 1)
        if sum(count for count, _ in stack) > MAX_YAML_NODES:
            raise BadInput(f"{what} expands to more than {MAX_YAML_NODES} values (aliases expanded)")
    return yaml.safe_load(text)


def read_yaml_file(path: Path, what: str):
    """read_yaml of a file, which must be UTF-8 text; YAML's own errors are the caller's to word."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise BadInput(f"{what} cannot be read: {e.strerror or e}") from None
    return read_yaml(text, what)


def read_yaml_mapping(path: Path, what: str, mapping: str = "a mapping") -> dict:
    """A YAML file that must hold a mapping (a recipe, a launch config), or one BadInput line naming `what`."""
    if not path.is_file():
        raise BadInput(f"{what} not found: {path}")
    try:
        raw = read_yaml_file(path, f"{what} {path}") or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise BadInput(f"{what} {path} is not valid YAML{at}: {getattr(e, 'problem', None) or first_line(e)}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{what} {path} must be {mapping}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from defaults when path is None) and apply `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml_mapping(Path(path), "config file", "a mapping of sections (model, data, train)")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    for section in raw:
        if section not in SECTIONS:
            raise BadInput(f"unknown config section {str(section)!r} (expected one of: {', '.join(SECTIONS)})")
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
                raise BadInput(f"unknown config key {f'{section}.{key}'!r} (known keys: {', '.join(sorted(known))})")
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
        value = read_yaml(text, f"override '{item}'") if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string that YAML cannot parse, e.g. a path with ': '
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    section, name = key.split(".")
    if section not in SECTIONS:
        raise BadInput(f"unknown config section {section!r} in override {key!r}")
    if not isinstance(raw.get(section) or {}, dict):
        raise BadInput(f"config section '{section}' must be a mapping")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][name] = value


def _shown(value: Any) -> str:
    """A value in a message: its repr, cut to a line (a value may be huge)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        raise BadInput(f"config key {key}: expected {' or '.join(errors)}, got {_shown(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise BadInput(f"config key {key}: expected a list, got {_shown(value)}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise BadInput(f"config key {key}: expected true or false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadInput(f"config key {key}: expected an integer, got {_shown(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise BadInput(f"config key {key}: expected a number, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise BadInput(f"config key {key}: expected a non-empty string, got {_shown(value)}")
    raise AssertionError(f"unsupported config type {tp} for {key}")
