"""`harness reference`: the config reference (docs/configuration.md), written from the config dataclasses' field
docs, so the documented keys and defaults are the code's."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from harness import config

SECTIONS = {"model": config.ModelConfig, "data": config.DataConfig, "train": config.TrainConfig}

INTRO = """# Configuration reference

A recipe (`configs/*.yaml`) has three sections, `model`, `data` and `train`; any key can be overridden on the
command line as `section.key=value` (the value is read as a YAML scalar). An unknown key, a wrong type or an
impossible value is refused with one line naming the key (exit 2). Hardware, the number of processes and mixed
precision are not here: they belong to the `accelerate launch` config.

This file is written by `harness reference > docs/configuration.md` from the field docs in `harness/config.py`;
a test fails when the two differ.
"""


def field_docs(cls) -> dict[str, str]:
    """{field: the docstring written under it} for a dataclass (attribute docstrings, read from the source)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_text(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def markdown() -> str:
    parts = [INTRO.rstrip()]
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        parts.append(f"\n## `{section}`\n\n| key | default | meaning |\n| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            text = docs.get(f.name, "").replace("|", "\\|")
            parts.append(f"| `{section}.{f.name}` | {default_text(f)} | {text} |")
    return "\n".join(parts) + "\n"
