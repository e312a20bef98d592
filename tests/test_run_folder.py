"""The run folder decides fresh / resume / finished, and only it clears a run."""

import json
from pathlib import Path

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
    assert sorted(p.name for p in run.root.iterdir()) == ["config.yaml", "harness-run.json", "notes.txt"]


def test_a_fresh_start_is_refused_where_others_files_stand_at_harness_names_and_allowed_beside_others(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "final").mkdir()
    (mine / "final" / "thesis.tex").write_text("years of work")
    with pytest.raises(BadInput, match=r"mine is not a harness run folder and holds final, which a run would write over"):
        RunFolder(mine).decide(cfg_for(mine))
    assert (mine / "final" / "thesis.tex").read_text() == "years of work"
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "notes.txt").write_text("mine")
    run = RunFolder(beside)
    assert run.decide(cfg_for(beside)) == ("fresh", None)  # nothing of the user's stands where harness writes
    run.begin(cfg_for(beside), fresh=True)
    assert json.loads((beside / "harness-run.json").read_text())["written_by"] == "harness"
    assert "notes.txt" not in run.owned() and {"config.yaml", "final", "checkpoints"} <= run.owned()


def test_overwrite_removes_only_what_harness_wrote_and_never_follows_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_text("precious")
    run = RunFolder(tmp_path / "run")
    run.begin(cfg_for(run.root), fresh=True)
    run.metrics.write_text('{"step": 1}\n')
    complete_checkpoint(run, 1)
    (run.root / "notes.txt").write_text("mine")
    (run.root / "tensorboard").symlink_to(elsewhere)  # a link where harness would write: removed as a link
    other = cfg_for(run.root, "train.lr=1e-3", "train.overwrite=true")
    assert run.decide(other) == ("fresh", None)
    run.begin(other, fresh=True)
    assert not run.checkpoints.exists() and not run.metrics.exists() and not (run.root / "tensorboard").exists()
    assert (run.root / "notes.txt").read_text() == "mine" and (elsewhere / "data.bin").read_text() == "precious"


def test_a_marker_that_does_not_parse_owns_nothing_and_harness_0_1_folders_own_their_entries(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.begin(cfg_for(run.root), fresh=True)
    (run.root / "harness-run.json").write_text("{broken")
    assert run.owned() == set()
    (run.root / "harness-run.json").unlink()  # a folder harness 0.1 wrote: config.yaml of harness's sections
    (run.root / "sessions.jsonl").write_text("{}\n")
    assert run.owned() == {"config.yaml", "sessions.jsonl"}


@pytest.mark.parametrize("where", ["/", "~", "repository"])
def test_the_root_the_home_folder_and_the_repository_are_refused_as_output_folders(where, capsys):
    from harness.cli import main
    from harness.run_folder import REPOSITORY

    folder = {"/": "/", "~": str(Path.home()), "repository": str(REPOSITORY)}[where]
    assert main(["plan", "--config", str(REPOSITORY / "configs" / "quickstart.yaml"), f"train.output_dir={folder}"]) == 2
    assert "give the run a folder of its own" in capsys.readouterr().err
    assert not Path(folder, "run.lock").exists() and not Path(folder, "harness-run.json").exists()
