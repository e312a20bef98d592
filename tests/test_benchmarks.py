"""The benchmark runner's children see the packages their parent sees (PITFALLS #22)."""

import os

from benchmarks._children import REPO, child_env


def test_child_pythonpath_extends_the_parents_never_replaces_it(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/opt/other"]))
    path = child_env()["PYTHONPATH"].split(os.pathsep)
    assert path == [str(REPO), "/tmp/site", "/opt/other"]
    monkeypatch.delenv("PYTHONPATH")
    assert child_env()["PYTHONPATH"] == str(REPO)
