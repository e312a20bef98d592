"""The sbatch scripts under a fake Slurm (PATH shims), and a real 2-node launch on one machine."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.helpers import CPU_LAUNCH, REPO, free_port, write_config

SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch")) + sorted(SLURM.glob("*.sh"))

SHIMS = {
    # scontrol show hostnames LIST -> the fake hosts; scontrol requeue ID -> logged
    "scontrol": """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_HOSTS; exit 0; fi
if [ "$1" = "requeue" ]; then echo "requeue $2" >> "$FAKE_LOG/scontrol"; exit 0; fi
exit 1
""",
    # srun OPTIONS CMD...: one task per node, each with its own SLURM_NODEID; forwards USR1 like srun does
    "srun": """#!/usr/bin/env bash
while [ "${1#-}" != "$1" ]; do shift; done
pids=()
trap '[ ${#pids[@]} -eq 0 ] || kill -USR1 "${pids[@]}" 2>/dev/null' USR1
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while kill -0 "$p" 2>/dev/null; do wait "$p"; done
  wait "$p"; r=$?  # the task's own status: a wait cut short by the trap returns 138
  [ "$r" -ne 0 ] && rc=$r
done
exit $rc
""",
    # accelerate launch ...: records its arguments per node, then finishes, waits to be preempted, or crashes
    "accelerate": """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/launch-$SLURM_NODEID"
case "$FAKE_MODE" in
  finish) mkdir -p "$FAKE_OUTPUT/final"; echo '{}' > "$FAKE_OUTPUT/final/config.json"; exit 0 ;;
  crash) exit 1 ;;
  stall) mkdir -p "$FAKE_OUTPUT"; echo "rank 1 made no training progress for 900 s" > "$FAKE_OUTPUT/stop_reason.txt"; exit 1 ;;
  preempt) bash -c 'trap "echo checkpointed >> $FAKE_LOG/worker-$SLURM_NODEID; exit 0" USR1
                   touch "$FAKE_LOG/ready-$SLURM_NODEID"; while :; do sleep 0.05; done' &
           wait $! ;;
esac
""",
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    r = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


@pytest.fixture
def fake_slurm(tmp_path, tiny_model):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in SHIMS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out)

    def run(script, nodes, mode, background=False, args=(), output=None, **extra_env):
        env = {
            **os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "FAKE_LOG": str(log), "FAKE_MODE": mode, "FAKE_OUTPUT": str(output or out),
            "FAKE_HOSTS": " ".join(f"gpu-node-{i}" for i in range(nodes)),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": f"gpu-node-[0-{nodes - 1}]", "SLURM_GPUS_ON_NODE": "8",
            "SLURM_NODEID": "0",  # as in a real batch shell: each task must read its own
            "SLURM_SUBMIT_DIR": str(REPO), **extra_env,
        }
        cmd = ["bash", str(SLURM / script), str(cfg), *args, "train.max_steps=7"]
        if background:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    return run, log, cfg


def expected_launch(cfg, nodes, rank):
    return ["launch", "--config_file", "launch_configs/accelerate/multi_gpu.yaml",
            "--num_machines", str(nodes), "--num_processes", str(8 * nodes), "--machine_rank", str(rank),
            "--main_process_ip", "gpu-node-0", "--main_process_port", str(20000 + 4242),
            "-m", "harness", "train", "--config", str(cfg), "train.max_steps=7"]


def test_each_node_runs_its_own_rank_against_the_same_head(fake_slurm):
    run, log, cfg = fake_slurm
    r = run("train_multi_node.sbatch", 2, "finish")
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert (log / f"launch-{rank}").read_text().splitlines() == expected_launch(cfg, 2, rank)
    assert "world size      2 node(s) x 8 process(es) = 16 processes  [Slurm job 4242]" in r.stdout, "harness plan ran first"
    assert "training finished" in r.stdout and not (log / "scontrol").exists(), "a finished run is not requeued"


def test_single_node_script(fake_slurm):
    run, log, cfg = fake_slurm
    r = run("train_single_node.sbatch", 1, "finish")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (log / "launch-0").read_text().splitlines() == expected_launch(cfg, 1, 0)
    assert not (log / "launch-1").exists()


def test_usr1_reaches_every_training_process_and_the_job_requeues(fake_slurm):
    run, log, cfg = fake_slurm
    proc = run("train_multi_node.sbatch", 2, "preempt", background=True)
    deadline = time.time() + 60
    while not ((log / "ready-0").exists() and (log / "ready-1").exists()) and time.time() < deadline:
        time.sleep(0.05)  # until both fake training processes have their USR1 handler
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert (log / "worker-0").read_text() == (log / "worker-1").read_text() == "checkpointed\n"
    assert (log / "scontrol").read_text() == "requeue 4242\n"


def test_a_crash_is_not_requeued(fake_slurm):
    run, log, _ = fake_slurm
    r = run("train_multi_node.sbatch", 2, "crash")
    assert r.returncode != 0 and not (log / "scontrol").exists()
    assert "not requeueing" in r.stdout


def test_a_stalled_job_is_not_requeued_and_the_script_says_why(fake_slurm):
    # the launcher exits 1 whatever its ranks exited with (4 for a stall): the run folder says why
    run, log, _ = fake_slurm
    r = run("train_multi_node.sbatch", 2, "stall")
    assert r.returncode != 0 and not (log / "scontrol").exists()
    assert ("training stopped with status 1 and no final model: rank 1 made no training progress for 900 s; "
            "not requeueing") in r.stdout


def test_a_sweep_task_trains_its_line_into_its_own_folder(fake_slurm, tmp_path):
    run, log, cfg = fake_slurm
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\ntrain.lr=2e-5 train.seed=1\n\ntrain.lr=3e-5  train.seed=1\n")
    folder = tmp_path / "out-sweep" / "train.lr=3e-5_train.seed=1"  # the recipe's output_dir + "-sweep/" + the line
    r = run("sweep.sbatch", 1, "finish", args=[str(sweep)], output=folder, SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 0, r.stdout + r.stderr
    launched = (log / "launch-0").read_text().splitlines()
    assert launched[-4:] == ["train.max_steps=7", "train.lr=3e-5", "train.seed=1", f"train.output_dir={folder}"]
    assert f"training finished: {folder}/final" in r.stdout and not (log / "scontrol").exists()
    beyond = run("sweep.sbatch", 1, "finish", args=[str(sweep)], SLURM_ARRAY_TASK_ID="2")
    assert beyond.returncode == 2 and f"{sweep} has no line for array task 2" in beyond.stderr
    flags = tmp_path / "flags.txt"
    flags.write_text("--help\n")  # a flag would end the task at exit 0 having trained nothing
    refused = run("sweep.sbatch", 1, "finish", args=[str(flags)], SLURM_ARRAY_TASK_ID="0")
    assert refused.returncode == 2 and "'--help' is not a section.key=value override" in refused.stderr
    assert not (log / "launch-0").read_text().count("--help")


@pytest.mark.slow
def test_two_launchers_from_the_node_script_train_one_model(tmp_path, tiny_model):
    """A real 2-node job on one machine: slurm/launch_node.sh started twice, as srun would on two nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '127.0.0.1\\n127.0.0.2\\n'\n")
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, train={"max_steps": 4})
    env = {**os.environ, "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[1-2]", "LAUNCH_CONFIG": str(CPU_LAUNCH),
           "GPUS_PER_NODE": "1", "MAIN_PORT": str(free_port())}
    nodes = [subprocess.Popen(["bash", str(SLURM / "launch_node.sh"), str(cfg)], cwd=REPO,
                              env={**env, "SLURM_NODEID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    results = [n.communicate(timeout=300) for n in nodes]
    for n, (stdout, stderr) in zip(nodes, results):
        assert n.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "--num_machines 2 --num_processes 2 --machine_rank 1 --main_process_ip 127.0.0.1" in results[1][0]
    assert "2 process(es)" in results[0][0]
    assert (out / "final" / "model.safetensors").is_file()
    # one writer: several ranks appending would repeat steps in metrics.jsonl and add TensorBoard files
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 2  # scalars + hparams
