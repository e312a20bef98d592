"""Run one system of a benchmark in a fresh process and read back its RESULT line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=child_env())
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{system} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def report(result: dict) -> None:
    """What a child prints last for its parent."""
    print("RESULT " + json.dumps(result), flush=True)
