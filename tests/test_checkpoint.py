"""Preemption-safe checkpoints and exact resume, with real processes and real signals."""

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file

from harness.checkpoint import COMPLETE, latest_checkpoint
from harness.errors import BadInput
from tests.helpers import CPU_LAUNCH, REPO, free_port, harness, losses, ok, write_config


def same_weights(a, b):
    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def start(cfg, procs, *overrides):
    """Start `harness train` in the background (1 process, or `procs` ranks via accelerate launch)."""
    if procs == 1:
        cmd = [sys.executable, "-m", "harness", "train", "--config", str(cfg), *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_LAUNCH),
               "--num_processes", str(procs), "--main_process_port", str(free_port()),
               "-m", "harness", "train", "--config", str(cfg), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and any(s >= step for s in losses(out)):
            return
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def ranks(proc, procs):
    """The training processes: the launcher itself for 1 process, else its children that carry a RANK."""
    if procs == 1:
        return {0: psutil.Process(proc.pid)}
    found = {}
    deadline = time.time() + 30
    while len(found) < procs and time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "harness" in " ".join(child.cmdline()):
                found[int(rank)] = child
        time.sleep(0.05)
    assert len(found) == procs, f"found ranks {sorted(found)}"
    return found


MID = {"data": {"train_samples": 32}, "train": {"max_steps": 12, "eval_every": 100}}


# 2 ranks only: exact resume on one process is test_signal_stops_saves_exits_0_and_resume_is_exact[1-0]
@pytest.mark.parametrize("procs", [2])
def test_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_run(tmp_path, tiny_model, procs):
    """12 steps straight vs. the same run resumed from its step-5 checkpoint (mid-epoch: 8 or 4 steps an
    epoch): the same per-step losses and the same final weights, bit for bit (dropout is on, so the
    restored RNG states matter)."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "straight", **MID)
    ok(harness("train", "--config", str(cfg), procs=procs))
    saving = tmp_path / "saving"
    ok(harness("train", "--config", str(cfg), f"train.output_dir={saving}", "train.save_every=5", procs=procs))
    assert sorted(p.name for p in (saving / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    resumed = tmp_path / "resumed"
    r = ok(harness("train", "--config", str(cfg), f"train.output_dir={resumed}",
                   f"train.resume={saving / 'checkpoints' / 'step-00000005'}", procs=procs))
    assert f"{procs} process(es)" in r.stdout and "resumed from" in r.stdout
    straight, after = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(after) == list(range(6, 13))
    assert {s: straight[s] for s in after} == after, "identical per-step losses after resume"
    assert losses(saving) == straight, "saving checkpoints does not perturb training"
    assert same_weights(tmp_path / "straight", resumed) and same_weights(tmp_path / "straight", saving)


def test_samples_seen_is_exact_after_a_resume_between_log_steps(tmp_path, tiny_model):
    """Logging every 4 steps and a checkpoint at step 5 (between two log steps): the resumed run counts
    the samples of steps 1-5 that no log record had reported yet."""
    sections = {"data": {"train_samples": 40}, "train": {"max_steps": 12, "log_every": 4, "eval_every": 100}}
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "straight", **sections)
    ok(harness("train", "--config", str(cfg), "train.save_every=5"))
    resumed = tmp_path / "resumed"
    ok(harness("train", "--config", str(cfg), f"train.output_dir={resumed}", "train.save_every=5",
               f"train.resume={tmp_path / 'straight' / 'checkpoints' / 'step-00000005'}"))
    assert json.loads((tmp_path / "straight" / "checkpoints" / "step-00000005" / "progress.json").read_text())["samples_seen"] == 20

    def seen(out):
        return {r["step"]: r["train/samples_seen"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "train/samples_seen" in r}

    assert seen(tmp_path / "straight") == {4: 16, 8: 32, 12: 48}  # 40 an epoch, batch 4: step 12 is 8 into epoch 2
    assert seen(resumed) == {8: 32, 12: 48}


LONG = {"data": {"train_samples": 64}, "train": {"max_steps": 80, "eval_every": 1000}}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model):
    """The uninterrupted LONG run, trained once per number of processes for the tests that stop and resume it:
    returns (config, its output folder); the tests train the same config into their own folders."""
    runs = {}

    def run(procs):
        if procs not in runs:
            tmp = tmp_path_factory.mktemp(f"straight-{procs}")
            cfg = write_config(tmp / "c.yaml", tiny_model, tmp / "straight", **LONG)
            ok(harness("train", "--config", str(cfg), procs=procs))
            runs[procs] = cfg, tmp / "straight"
        return runs[procs]

    return run


@pytest.mark.parametrize("procs, target", [(1, 0), (2, 1)])
def test_signal_stops_saves_exits_0_and_resume_is_exact(tmp_path, straight, procs, target):
    """SIGTERM to the only process, or SIGUSR1 to rank 1 alone: all ranks stop at the same step boundary,
    save, exit 0; `resume=auto` then finishes with the uninterrupted run's losses and weights."""
    cfg, reference = straight(procs)
    out = tmp_path / "stopped"
    proc = start(cfg, procs, f"train.output_dir={out}")
    wait_for_step(out, 3, proc)
    ranks(proc, procs)[target].send_signal(signal.SIGUSR1 if procs == 2 else signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by a signal at step" in stdout and stdout.count("resumable checkpoint:") == 1
    stopped_at = max(losses(out))
    assert 3 <= stopped_at < 80 and not (out / "final").exists()
    assert latest_checkpoint(out).name == f"step-{stopped_at:08d}"
    ok(harness("train", "--config", str(cfg), f"train.output_dir={out}", procs=procs))
    assert losses(out) == losses(reference)
    assert same_weights(out, reference)


def test_two_ranks_stopped_then_one_rank_sees_every_example_once(tmp_path, tiny_model):
    """400 examples, one epoch: 2 ranks x 4 per step, stopped by a signal; 1 rank x 4 finishes the epoch
    from the same sample position."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, data={"train_samples": 400}, train={"epochs": 1})
    proc = start(cfg, 2)
    wait_for_step(out, 3, proc)
    ranks(proc, 2)[0].send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    progress = json.loads((latest_checkpoint(out) / "progress.json").read_text())
    assert progress["world_size"] == 2 and progress["position"] == 8 * progress["step"] < 400
    r = ok(harness("train", "--config", str(cfg)))
    assert "1 process(es)" in r.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if "train/loss" in x]
    remaining = (400 - progress["position"] + 3) // 4
    assert train[-1]["step"] == progress["step"] + remaining
    assert train[-1]["train/samples_seen"] == 400, "the two parts of the epoch together cover it exactly"
    assert train[-1]["train/epoch"] == 1.0


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, straight):
    """Checkpoints every step, so the SIGKILL very likely lands inside a write; resume still works."""
    cfg, reference = straight(1)
    out = tmp_path / "killed"
    proc = start(cfg, 1, f"train.output_dir={out}", "train.save_every=1")
    wait_for_step(out, 6, proc)
    proc.kill()
    proc.communicate()
    latest = latest_checkpoint(out, warn=lambda m: None)
    assert latest is not None
    r = ok(harness("train", "--config", str(cfg), f"train.output_dir={out}", "train.save_every=1"))
    assert f"resumed from {latest}" in r.stdout
    assert losses(out) == losses(reference)
    assert same_weights(out, reference)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("saved")
    cfg = write_config(tmp / "c.yaml", tiny_model, tmp / "run",
                       data={"train_samples": 48}, train={"max_steps": 12, "save_every": 3, "keep_last": 2,
                                                         "best_metric": "accuracy", "eval_every": 3, "lr": 3e-3})
    ok(harness("train", "--config", str(cfg)))
    return cfg, tmp / "run"


def test_keep_last_keeps_the_newest_complete_checkpoints(saved_run):
    _, out = saved_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000009", "step-00000012"]


def test_best_holds_the_best_evaluation_as_an_hf_model(saved_run):
    from transformers import AutoModelForSequenceClassification

    _, out = saved_run
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    best = json.loads((out / "best" / "eval_results.json").read_text())
    first_best = next(r for r in evals if r["eval/accuracy"] == max(e["eval/accuracy"] for e in evals))
    assert best["accuracy"] == first_best["eval/accuracy"] and best["step"] == first_best["step"]
    AutoModelForSequenceClassification.from_pretrained(out / "best")


def test_unfinished_and_truncated_checkpoints_are_skipped_or_refused(saved_run, tmp_path):
    cfg, out = saved_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "final")  # an unfinished run, so that auto-resume looks at the checkpoints
    newest, older = run / "checkpoints" / "step-00000012", run / "checkpoints" / "step-00000009"
    (newest / COMPLETE).unlink()
    warnings = []
    assert latest_checkpoint(run, warn=warnings.append) == older
    assert warnings == [f"harness: warning: skipping checkpoint {newest}: no {COMPLETE} (unfinished write)"]

    weights = older / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = harness("train", "--config", str(cfg), f"train.output_dir={run}", f"train.resume={older}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"harness: error: train.resume: checkpoint {older} is incomplete or corrupt: model.safetensors has 1000 bytes")
    # auto skips both with a warning each and, with nothing left, starts over
    r = ok(harness("train", "--config", str(cfg), f"train.output_dir={run}", "train.max_steps=12"))
    assert f"skipping checkpoint {newest}" in r.stdout and f"skipping checkpoint {older}" in r.stdout
    assert (run / "final").is_dir()


def test_a_checkpoint_that_does_not_parse_is_refused_with_exit_2(saved_run, tmp_path):
    cfg, out = saved_run
    ckpt = tmp_path / "step"
    shutil.copytree(out / "checkpoints" / "step-00000012", ckpt)
    size = (ckpt / "optimizer.bin").stat().st_size
    (ckpt / "optimizer.bin").write_bytes(b"\0" * size)  # same size, garbage content
    r = harness("train", "--config", str(cfg), f"train.output_dir={tmp_path / 'new'}", f"train.resume={ckpt}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"harness: error: checkpoint {ckpt} cannot be loaded" in r.stderr


def test_resume_none_refuses_an_existing_run(saved_run):
    cfg, out = saved_run
    r = harness("train", "--config", str(cfg), "train.resume=none")
    assert r.returncode == 2 and "already holds a run and train.resume=none" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("field, value", [("step", "7"), ("position", -3), ("world_size", 0), ("best_value", "high"),
                                          ("sharding", 3), ("epoch", 1.5), ("best_step", True)])
def test_a_progress_file_with_a_value_no_run_writes_is_refused(tmp_path, field, value):
    from harness.checkpoint import PROGRESS, read_progress

    (tmp_path / PROGRESS).write_text(json.dumps({"step": 4, field: value}))
    with pytest.raises(BadInput, match=rf"{PROGRESS} has {field}="):
        read_progress(tmp_path)
    (tmp_path / PROGRESS).write_text(json.dumps({"step": 4, "best_value": 0.5, "best_step": None}))
    assert read_progress(tmp_path).step == 4


@pytest.mark.slow
def test_a_load_that_fails_on_one_rank_stops_every_rank_together_naming_the_file(tmp_path, tiny_model):
    """Rank 1's RNG state is gone (COMPLETE.json rewritten to match): Accelerate would skip it at info level and
    resume with other random numbers. Both ranks refuse the checkpoint, rank 1 naming the file, and exit 2
    together, leaving no lock behind."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", data={"train_samples": 32},
                       train={"max_steps": 2, "save_every": 2, "eval_every": 100})
    assert "2 process(es) x batch" in ok(harness("train", "--config", str(cfg), procs=2)).stdout
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    (checkpoint / "random_states_1.pkl").unlink()
    record = json.loads((checkpoint / COMPLETE).read_text())
    del record["files"]["random_states_1.pkl"]
    (checkpoint / COMPLETE).write_text(json.dumps(record))
    started = time.monotonic()
    r = harness("train", "--config", str(cfg), f"train.resume={checkpoint}", procs=2)
    ranks = r.stderr.split("exitcode")[0]
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    assert "random_states_1.pkl cannot be read" in ranks and "cannot be loaded on rank 1" in ranks, ranks[-2000:]
    assert "Traceback" not in ranks and time.monotonic() - started < 120
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_universal_copy_goes_when_its_checkpoint_goes(tmp_path):
    """Pruning keeps a DeepSpeed universal copy beside its checkpoint and removes one whose checkpoint is gone,
    finished or not; it touches nothing that harness did not name."""
    from harness.checkpoint import prune

    root = tmp_path / "checkpoints"
    for step in (3, 6):
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "progress.json").write_text("{}")
        (folder / COMPLETE).write_text(json.dumps({"step": step, "files": {"progress.json": 2}}))
    for name in ("universal-step-00000003", "universal-step-00000006", "universal-step-00000001",
                 "universal-step-00000002.tmp", "notes"):
        (root / name).mkdir()
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-00000006", "universal-step-00000006"]
