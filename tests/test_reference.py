"""docs/configuration.md is what `harness reference` prints: every config key, its default and its doc."""

import dataclasses
from dataclasses import dataclass

from harness.cli import main
from harness.reference import SECTIONS, field_docs, markdown
from tests.helpers import REPO


def test_the_committed_reference_is_what_the_command_prints(capsys):
    assert main(["reference"]) == 0
    printed = capsys.readouterr().out
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert printed == committed, "run: harness reference > docs/configuration.md"


def test_every_key_is_documented_with_its_default():
    page = markdown()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{section}.{f.name} has no doc in harness/config.py"
            assert f"| `{section}.{f.name}` |" in page


@dataclass
class _Documented:
    kept: int = 1
    """A doc that spans
    two lines."""
    bare: str = "x"


def test_field_docs_reads_the_docstring_under_each_field_and_nothing_for_a_bare_one():
    assert field_docs(_Documented) == {"kept": "A doc that spans two lines."}
