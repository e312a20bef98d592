"""The run folder decides fresh / resume / finished, and only it clears a run."""

import json

import pytest

from harness.recipes import load_config
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
    run.metrics.write_text('{"step": 1, "train/loss": 0.7}\n')  # it trained: a different config is refused
    with pytest.raises(BadInput, match=r"differs in: train.lr"):
        run.decide(cfg_for(run.root, "train.lr=0.1"))
    assert run.decide(cfg_for(run.root, "train.log_every=3", "train.report_to=none"))[0] == "fresh"
    assert run.decide(cfg_for(run.root, "train.lr=0.1", "train.overwrite=true")) == ("fresh", None)


@pytest.mark.parametrize("result", ["logged step", "unfinished checkpoint", "best", "final"])
def test_a_config_is_replaced_only_where_its_run_trained_nothing(tmp_path, result):
    """A run stopped by a bad input before its first logged step leaves its config.yaml (and an empty metrics.jsonl):
    the corrected command starts there, even with train.resume=none, and with a warning. Anything trained is kept:
    a different config is refused."""
    run = RunFolder(tmp_path / "run")
    run.begin(cfg_for(run.root, "model.name_or_path=no-such-model"), fresh=True)
    run.metrics.touch()
    warnings = []
    assert run.decide(cfg_for(run.root), warn=warnings.append) == ("fresh", None)
    assert warnings == [f"{run.root} holds the config of a run that trained nothing (no logged step, checkpoint or "
                        "model): this config replaces it"]
    assert run.decide(cfg_for(run.root, "model.name_or_path=no-such-model", "train.resume=none")) == ("fresh", None)
    if result == "logged step":
        run.metrics.write_text('{"step": 1, "train/loss": 0.7}\n')
    elif result == "unfinished checkpoint":
        (run.checkpoints / "step-00000001.tmp").mkdir(parents=True)
    else:
        getattr(run, result).mkdir()
    with pytest.raises(BadInput, match=r"holds a run of a different config \(differs in: model.name_or_path\)"):
        run.decide(cfg_for(run.root))
    with pytest.raises(BadInput, match="already holds a run and train.resume=none"):
        run.decide(cfg_for(run.root, "model.name_or_path=no-such-model", "train.resume=none"))


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
