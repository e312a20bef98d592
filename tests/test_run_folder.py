"""The run folder decides fresh / resume / finished, and only it clears a run."""

import json

import pytest

from harness.config import load_config
from harness.errors import BadInput
from harness.run_folder import RunFolder


def cfg_for(out, *overrides):
    return load_config(None, [f"train.output_dir={out}", "data.dataset=synthetic", *overrides])


def complete_checkpoint(run: RunFolder, step: int):
    path = run.checkpoints / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "progress.json").write_text(json.dumps({"step": step}))
    (path / "COMPLETE.json").write_text(json.dumps({"step": step, "files": {"progress.json": len(json.dumps({"step": step}))}}))
    return path


def test_fresh_resume_and_finished(tmp_path):
    run = RunFolder(tmp_path / "run")
    cfg = cfg_for(run.root)
    assert run.decide(cfg) == ("fresh", None) and run.status(cfg) == "fresh"
    run.begin(cfg, fresh=True)
    assert run.config.is_file()
    ckpt = complete_checkpoint(run, 5)
    assert run.decide(cfg) == ("resume", ckpt) and run.status(cfg) == f"resume {ckpt}"
    run.final.mkdir()
    (run.final / "config.json").write_text("{}")
    assert run.status(cfg) == "finished" and run.is_finished()


def test_another_config_is_refused_naming_the_keys_and_neutral_keys_are_not(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.begin(cfg_for(run.root), fresh=True)
    with pytest.raises(BadInput, match=r"differs in: train.lr"):
        run.decide(cfg_for(run.root, "train.lr=0.1"))
    assert run.decide(cfg_for(run.root, "train.log_every=3", "train.report_to=none"))[0] == "fresh"
    assert run.decide(cfg_for(run.root, "train.lr=0.1", "train.overwrite=true")) == ("fresh", None)


def test_begin_fresh_clears_every_output_of_the_old_run(tmp_path):
    run = RunFolder(tmp_path / "run")
    cfg = cfg_for(run.root)
    run.begin(cfg, fresh=True)
    complete_checkpoint(run, 1)
    for folder in (run.best, run.final, run.tensorboard):
        folder.mkdir()
    for f in (run.metrics, run.deepspeed_config):
        f.write_text("x")
    (run.root / "notes.txt").write_text("mine")  # not a run output: kept
    run.begin(cfg, fresh=True)
    assert sorted(p.name for p in run.root.iterdir()) == ["config.yaml", "notes.txt"]
