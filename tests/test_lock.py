"""One run per output folder: the lock in OUTPUT_DIR/run.lock, its refusal, its takeover
when the holder is gone, and `harness plan` reporting it. The last test uses real concurrent processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness.cli import main
from harness.errors import BadInput
from harness.lock import RunLock
from harness.run_folder import RunFolder
from tests.helpers import REPO, harness, ok, write_config


def record(**fields) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": None, "slurm_job_id": None,
            "since": now - 60, "heartbeat": now, "token": "other", **fields}


def test_the_lock_names_its_holder_and_goes_when_released(tmp_path):
    lock = RunLock(tmp_path / "run.lock")
    lock.acquire()
    held = json.loads((tmp_path / "run.lock").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and held["token"] == lock.token
    with pytest.raises(BadInput, match=rf"is in use by another run: host {socket.gethostname()}, pid {os.getpid()}, since "):
        RunLock(tmp_path / "run.lock").acquire(wait_for_own_job=0)
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    RunLock(tmp_path / "run.lock").acquire()  # free again


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps(record(pid=dead.pid)))
    warnings = []
    lock = RunLock(tmp_path / "run.lock")
    lock.acquire(warn=warnings.append)
    assert len(warnings) == 1 and f"pid {dead.pid}" in warnings[0] and "its process no longer exists" in warnings[0]
    assert lock.owned()


def test_a_reused_process_id_is_not_taken_for_the_holder(tmp_path):
    # our own pid is alive, but the record says it started at another time: the holder is gone
    (tmp_path / "run.lock").write_text(json.dumps(record(started="1")))
    warnings = []
    RunLock(tmp_path / "run.lock").acquire(warn=warnings.append)
    assert "its process no longer exists" in warnings[0]


def test_another_hosts_lock_is_refused_while_its_heartbeat_is_fresh_and_taken_over_when_stale(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps(record(host="node-17", pid=4242, slurm_job_id="991", heartbeat=time.time() - 10)))
    with pytest.raises(BadInput, match=r"host node-17, pid 4242, Slurm job 991, since .* \(heartbeat 10 s ago\)"):
        RunLock(path).acquire(wait_for_own_job=0)
    path.write_text(json.dumps(record(host="node-17", pid=4242, heartbeat=time.time() - RunLock.STALE_S - 5)))
    warnings = []
    RunLock(path).acquire(warn=warnings.append)
    assert "node-17" in warnings[0] and f"more than {RunLock.STALE_S:.0f} s" in warnings[0]


def test_an_unreadable_lock_record_is_taken_over(tmp_path):
    (tmp_path / "run.lock").write_text('{"host": "node-1", "pi')  # a write cut short
    warnings = []
    RunLock(tmp_path / "run.lock").acquire(warn=warnings.append)
    assert "unreadable" in warnings[0]


def test_a_requeued_slurm_job_waits_for_its_previous_incarnation(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    path = tmp_path / "run.lock"
    path.write_text(json.dumps(record(host="node-17", pid=4242, slurm_job_id="991")))
    warnings = []
    with pytest.raises(BadInput, match="in use by another run"):  # the old one never lets go: refused after the wait
        RunLock(path).acquire(warn=warnings.append, wait_for_own_job=0.3)
    assert "waiting for the previous run of Slurm job 991" in warnings[0]
    # released while the new one waits: taken
    import threading

    threading.Timer(0.2, path.unlink).start()
    lock = RunLock(path)
    lock.acquire(warn=warnings.append, wait_for_own_job=5)
    assert lock.owned()


def test_the_heartbeat_is_refreshed_and_never_written_over_a_new_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path / "run.lock")
    lock.acquire()
    first = lock.read()["heartbeat"]
    time.sleep(0.3)
    assert lock.read()["heartbeat"] > first and lock.read()["since"] == pytest.approx(lock.since)
    # someone judged us gone and took over: we neither refresh nor remove their lock
    (tmp_path / "run.lock").write_text(json.dumps(record(host="node-2", token="theirs")))
    time.sleep(0.3)
    lock.release()
    assert lock.read()["token"] == "theirs"


def test_a_held_lock_refuses_a_second_run_on_two_ranks_and_kill_9_leaves_the_folder_usable(tmp_path, tiny_model, capsys):
    """Real processes: a run that holds the lock (made to hang after step 1 by fault injection), a second run
    into the same folder (2 ranks: the refusal is collective) refused with exit 2 naming the holder, `plan`
    reporting it; then the holder is killed with SIGKILL and a third run takes the lock over and finishes."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, train={"max_steps": 4, "save_every": 2})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_STALL_STEP": "1"}
    holder = subprocess.Popen([sys.executable, "-m", "harness", "train", "--config", str(cfg), "train.stall_timeout_s=null"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in holder.stderr:  # the holder is past its first step, and stays there
            if "fault injection: rank 0 stalls after step 1" in line:
                break
        assert holder.poll() is None and (out / "run.lock").is_file()
        second = harness("train", "--config", str(cfg), procs=2)
        line = (f"harness: error: train.output_dir {out} is in use by another run: host {socket.gethostname()}, "
                f"pid {holder.pid}, since ")
        assert second.returncode != 0 and second.stderr.count(line) == 2, second.stderr[-3000:]
        assert "exitcode  : 2" in second.stderr and "Traceback" not in second.stderr.split("exitcode")[0]
        assert main(["plan", "--config", str(cfg)]) == 0  # `harness plan`, in this process (no import cost)
        assert f"lock            held by a live run: host {socket.gethostname()}, pid {holder.pid}" in capsys.readouterr().out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / "run.lock").is_file(), "kill -9 leaves the lock behind"
    assert main(["plan", "--config", str(cfg)]) == 0
    assert "whose holder is gone (its process no longer exists on this host)" in capsys.readouterr().out
    third = ok(harness("train", "--config", str(cfg)))
    assert f"took over the lock {out / 'run.lock'} of host {socket.gethostname()}, pid {holder.pid}" in third.stdout
    assert (out / "final" / "model.safetensors").is_file() and not (out / "run.lock").exists()
    assert RunFolder(out).lock_status() == "free"
