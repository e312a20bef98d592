"""Run one system of a benchmark in a fresh process and read back its RESULT line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(script: str, args: list[str], system: str) -> dict:
    proc = subprocess.run([sys.executable, script, *args, "--child", system], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"{system} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def report(result: dict) -> None:
    """What a child prints last for its parent."""
    print("RESULT " + json.dumps(result), flush=True)
