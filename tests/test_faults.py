"""Nothing lost, nothing hangs: a rank that stalls is ended by the watchdog with
its stacks; a checkpoint or model write that fails (injected ENOSPC at every point of the write, in this
process; a really failing write under RLIMIT_FSIZE; a failure on one of two ranks) stops every rank and
leaves the previous complete checkpoint usable."""

import os
import resource
import subprocess
import sys
import time

import pytest

import torch

from harness.checkpoint import Progress, checkpoint_dir, complete_checkpoints, save_checkpoint, verify
from harness.export import save_model
from harness.faults import Faults
from harness.errors import WriteFailed
from tests.helpers import CPU_LAUNCH, REPO, free_port, harness, losses, ok, write_config



@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_within_the_bound_with_its_stacks_and_the_run_resumes(tmp_path, tiny_model):
    out = tmp_path / "run"
    bound = 6
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out,
                       train={"max_steps": 8, "save_every": 2, "eval_every": 100, "stall_timeout_s": bound})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_LAUNCH), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "harness", "train", "--config", str(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_STALL_STEP": "5", "HARNESS_FAULT_STALL_RANK": "1"}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    try:
        for line in job.stderr:  # rank 1 hangs after step 5; rank 0 goes on and waits for it in a collective
            stderr.append(line)
            if "fault injection: rank 1 stalls after step 5" in line:
                break
        hung_at = time.monotonic()
        _, rest = job.communicate(timeout=bound * 3 + 120)
        ended_after = time.monotonic() - hung_at
    finally:
        if job.poll() is None:
            job.kill()
    stderr = "".join(stderr) + rest
    # the bound, the watchdog's polling (bound/10) and the launcher tearing the job down
    assert ended_after < bound + 30, f"the job ended {ended_after:.0f} s after the stall (bound {bound} s)"
    assert job.returncode != 0 and "exitcode  : 4" in stderr, stderr[-3000:]
    assert f"harness: error: rank 1 made no training progress for {bound}" in stderr
    assert "last completed step 5); stopped by the stall watchdog; the stacks of its threads follow" in stderr
    # faulthandler's dump of every thread, each line labelled: the hung one sleeps in the injected fault
    assert "[rank 1] Thread 0x" in stderr or "[rank 1] Current thread 0x" in stderr, stderr[-6000:]
    assert any(line.startswith("[rank 1]   File") and 'harness/guards.py", line' in line and line.endswith(" in beat")
               for line in stderr.splitlines()), stderr[-6000:]
    assert "made no training progress" in (out / "stop_reason.txt").read_text()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002", "step-00000004"]  # keep_last 2
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("step-00000006*"))

    # no fault: the run finishes from step 4 (on one process: DDP state resumes on any world size, and it is cheaper)
    resumed = ok(harness("train", "--config", str(cfg)))
    assert f"resumed from {out / 'checkpoints' / 'step-00000004'}" in resumed.stdout
    assert (out / "final" / "model.safetensors").is_file() and not (out / "stop_reason.txt").exists()
    assert max(losses(out)) == 8


def limit_file_size(max_bytes: int):
    def apply():  # in the child, before exec: every file it writes is capped (a full disk, for real)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def snapshot(folder) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture
def accelerator():
    """A real one-process Accelerator in this process (cheap: the write path without a launch per case)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


KEPT = "; the newest complete checkpoint is intact: {}; free space (or fix the storage) and run again to resume"


@pytest.mark.parametrize("point", ["mkdir", "state", "progress", "complete", "rename"])
def test_a_checkpoint_write_failing_at_any_point_keeps_the_last_complete_one(tmp_path, accelerator, point):
    """keep_last=1: pruning must not remove step 2 before step 4 is complete, and step 4 never completes."""
    model = torch.nn.Linear(64, 64)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    save_checkpoint(accelerator, tmp_path, Progress(step=2), keep_last=1)
    step2, step4 = checkpoint_dir(tmp_path, 2), checkpoint_dir(tmp_path, 4)
    intact = snapshot(step2)
    full_disk = Faults.from_env({"HARNESS_FAULT_WRITE": f"{point}@4"})
    with pytest.raises(WriteFailed) as failed:
        save_checkpoint(accelerator, tmp_path, Progress(step=4), keep_last=1, faults=full_disk)
    message = str(failed.value)
    assert message.startswith(f"could not write {step4}: [Errno 28] No space left on device (injected at '{point}') (")
    assert message.endswith(KEPT.format(step2)) and "MiB free there)" in message
    assert not step4.exists() and not step4.with_name("step-00000004.tmp").exists(), "the partial write is removed"
    assert snapshot(step2) == intact and verify(step2) is None, "the last complete checkpoint is untouched"
    # space again: the write succeeds, and only then is step 2 pruned
    save_checkpoint(accelerator, tmp_path, Progress(step=4), keep_last=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004"]


def test_a_failing_model_export_keeps_the_previous_one(tmp_path, accelerator, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = accelerator.prepare(AutoModelForSequenceClassification.from_pretrained(tiny_model))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    save_model(accelerator, model, tokenizer, tmp_path / "best", extra={"step": 2})
    before = snapshot(tmp_path / "best")
    with pytest.raises(WriteFailed, match=rf"^could not write {tmp_path / 'best'}: \[Errno 28\] No space left"):
        save_model(accelerator, model, tokenizer, tmp_path / "best", extra={"step": 4},
                   faults=Faults.from_env({"HARNESS_FAULT_WRITE": "model"}))
    assert snapshot(tmp_path / "best") == before and not (tmp_path / "best.tmp").exists()


@pytest.mark.slow
def test_a_really_failing_write_stops_the_run_with_one_line_and_leaves_nothing_partial(tmp_path, tiny_model):
    """No injection: RLIMIT_FSIZE (2 MB) below the model's safetensors file (4 MB), so the first checkpoint's
    write fails as on a full disk, here inside safetensors or torch.save (whose own message is cryptic)."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, train={"max_steps": 6, "save_every": 2, "eval_every": 100})
    r = subprocess.run([sys.executable, "-m", "harness", "train", "--config", str(cfg)], cwd=REPO,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300,
                       preexec_fn=limit_file_size(2_000_000))
    step2 = out / "checkpoints" / "step-00000002"
    assert r.returncode == 5 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"harness: error: could not write {step2}: ") and "MiB free there)" in line, line
    assert line.endswith("; no complete checkpoint yet; free space (or fix the storage) and run again to resume"), line
    assert not list((out / "checkpoints").iterdir()), "the partial checkpoint is removed"
    assert "could not write" in (out / "stop_reason.txt").read_text()
    assert not (out / "final").exists() and not (out / "run.lock").exists(), "the lock is released on the way out"


@pytest.mark.slow
def test_a_write_failing_on_one_rank_stops_both_ranks(tmp_path, tiny_model):
    """Two ranks: ENOSPC on rank 1 while it saves its part of the state (its RNG state file): both ranks stop
    at that checkpoint (none waits in a collective for the other), the partial folder is removed, step 2 is
    untouched, and the run resumes from it."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out,
                       train={"max_steps": 4, "save_every": 2, "keep_last": 1, "eval_every": 100})
    r = harness("train", "--config", str(cfg), procs=2,
                env={"HARNESS_FAULT_WRITE": "state@4", "HARNESS_FAULT_WRITE_RANK": "1"})
    step2, step4 = out / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000004"
    # both ranks exit 5; the launcher may record only the first (it sends SIGTERM to the other, which ignores it)
    assert r.returncode != 0 and "exitcode  : 5" in r.stderr, r.stderr[-3000:]
    assert f"could not write {step4}: [Errno 28] No space left on device (injected at 'state')" in r.stderr
    assert f"could not write {step4}: the write failed on rank 1 (its own line says why)" in r.stderr
    assert not step4.exists() and not step4.with_name("step-00000004.tmp").exists()
    assert verify(step2) is None
    done = ok(harness("train", "--config", str(cfg)))  # one process: cheaper, and DDP state resumes on any world size
    assert f"resumed from {step2}" in done.stdout and (out / "final" / "model.safetensors").is_file()


def test_faults_are_read_from_the_environment_once_and_name_their_rank_and_step():
    none = Faults.from_env({})
    assert not none.stalls(0, 5) and not none.poisons(0, 5)
    none.write("state", 0, 4)  # no fault asked: nothing raised
    stall = Faults.from_env({"HARNESS_FAULT_STALL_STEP": "5", "HARNESS_FAULT_STALL_RANK": "1"})
    assert stall.stalls(1, 5) and not stall.stalls(0, 5) and not stall.stalls(1, 4)
    nan = Faults.from_env({"HARNESS_FAULT_NONFINITE_STEP": "3"})  # every rank by default
    assert nan.poisons(0, 3) and nan.poisons(1, 3) and not nan.poisons(0, 2)
    disk = Faults.from_env({"HARNESS_FAULT_WRITE": "state@4", "HARNESS_FAULT_WRITE_RANK": "1"})
    disk.write("state", 0, 4)  # another rank
    disk.write("state", 1, 2)  # another step
    disk.write("progress", 1, 4)  # another point
    with pytest.raises(OSError, match="No space left on device"):
        disk.write("state", 1, 4)
