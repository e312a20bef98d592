"""Run one system of a benchmark in a fresh process and read back its RESULT line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# lines of a run that say whether it ran as asked (graphs captured or skipped, compilations, capture failures):
# passed on to the parent's output and its RESULT, since a timing alone cannot tell
NOTES = ("CUDA graphs", "torch.compile", "train.cuda_graphs", "first step in")


def child_env() -> dict:
    """The parent's environment with the repository put first on PYTHONPATH: extended, never replaced, so
    packages that live on PYTHONPATH (wheels unpacked into a folder, as on a machine without pip) still import."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_child(module: str, args: list[str], system: str, launch_config: str | None = None) -> dict:
    """`python -m MODULE ARGS --child SYSTEM` from the repository root; returns its RESULT. With `launch_config`,
    the child runs as one process under `accelerate launch` with that shipped config (e.g. DeepSpeed)."""
    launcher = [] if launch_config is None else [
        "-m", "accelerate.commands.launch", "--config_file", launch_config, "--num_processes", "1"]
    cmd = [sys.executable, *launcher, "-m", module, *args, "--child", system]
    # HARNESS_BENCH_CHILD_TIMEOUT (seconds): a run that has not finished by then (say, a compilation that takes
    # minutes) is stopped with its own children, and counts as failed, so that the others' figures still come back
    timeout = float(os.environ.get("HARNESS_BENCH_CHILD_TIMEOUT") or 0) or None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        print(stdout[-3000:], stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{system} did not finish in {timeout:.0f} s (HARNESS_BENCH_CHILD_TIMEOUT)") from None
    line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(stdout[-3000:], stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{system} failed (exit {proc.returncode})")
    result = json.loads(line[len("RESULT "):])
    result["notes"] = [l.strip() for l in stdout.splitlines() if l.strip().startswith(NOTES)]
    for note in result["notes"]:
        print(f"{system}: {note}", flush=True)
    return result


def report(result: dict) -> None:
    """What a child prints last for its parent."""
    print("RESULT " + json.dumps(result), flush=True)
