"""The package's shape: modules import only from the layers below them (so no circle), no `harness` import hides
inside a function (cli.py's, which keep start-up fast, excepted), and every module says what it is for."""

import ast

import pytest

from tests.helpers import REPO

# Lowest first. A module may import from the layers below its own, never from its own layer or above.
LAYERS = [
    ("errors", "faults"),
    ("config", "safeload"),
    ("recipes", "schedule", "families", "tasks"),
    ("sources", "optim", "dropout", "attention", "modeling", "distributed", "graphs", "consolidate"),
    ("data", "precision", "checkpoint", "guards", "tracking"),
    ("lock", "export", "evaluation", "stepper", "resume"),
    ("run_folder", "inference", "report", "reference"),
    ("trainer", "plan"),
    ("cli",),
    ("__main__",),
]
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}
PACKAGE = -1  # `from harness import __version__`: the package's own __init__, below every module
MODULES = sorted(p for p in (REPO / "harness").glob("*.py") if p.stem != "__init__")


def harness_imports(tree: ast.AST):
    """(module imported, whether inside a function) for each `from harness... import` and `import harness...`."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "harness":
                names = ([a.name if a.name in LAYER else "__init__" for a in child.names] if child.module == "harness"
                         else [child.module.split(".")[1]])
                yield from ((name, in_function) for name in names)
            elif isinstance(child, ast.Import):
                yield from ((a.name.split(".")[1], in_function) for a in child.names if a.name.startswith("harness."))
            yield from walk(child, inside)
    yield from walk(tree, False)


def test_every_module_has_a_layer():
    assert {p.stem for p in MODULES} == set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_a_module_imports_only_from_lower_layers_and_never_inside_a_function(path):
    for imported, in_function in harness_imports(ast.parse(path.read_text())):
        layer = PACKAGE if imported == "__init__" else LAYER[imported]
        assert layer < LAYER[path.stem], f"{path.stem} (layer {LAYER[path.stem]}) imports {imported}"
        assert not in_function or path.stem == "cli", f"{path.stem} imports harness.{imported} inside a function"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_every_module_says_what_it_is_for_and_stays_small(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and doc.split("\n\n")[0].rstrip().endswith((".", ")")), f"{path.stem}: no one-sentence docstring"
    assert len(path.read_text().splitlines()) <= 350, f"{path.stem} is over 350 lines"
    longest = max(((n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), default=(0, ""))
    assert longest[0] <= 60 or (path.stem, longest[1]) == ("config", "validate"), f"{path.stem}.{longest[1]}: {longest[0]} lines"


def test_the_loop_has_no_nested_functions():
    tree = ast.parse((REPO / "harness" / "trainer.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = [getattr(n, "name", "lambda") for n in ast.walk(node)
                     if n is not node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
            assert not inner, f"trainer.{node.name} defines {inner}"


def test_the_import_check_sees_imports_inside_functions_and_through_the_package():
    tree = ast.parse("from harness.errors import BadInput\nfrom harness import trainer\n"
                     "def f():\n    if True:\n        from harness.plan import plan\n")
    assert list(harness_imports(tree)) == [("errors", False), ("trainer", False), ("plan", True)]
