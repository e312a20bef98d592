"""DeepSpeed ZeRO-2/3 through `accelerate launch` with the shipped launch configs, 2 real ranks on the CPU."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, free_port, harness, ok, write_config

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional dependency: pip install -e '.[deepspeed]'")
pytestmark = pytest.mark.slow

LAUNCH = REPO / "launch_configs" / "accelerate"


def ds_harness(zero, *args, procs=2, launch_config=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(launch_config or LAUNCH / f"deepspeed_{zero}.yaml"),
           "--num_processes", str(procs), "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "harness", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def losses(out):
    return {r["step"]: r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The same 10 steps (2 ranks x batch 4, fp32, same seed and data) under DDP, ZeRO-2 and ZeRO-3."""
    tmp = tmp_path_factory.mktemp("ds")
    cfg = write_config(tmp / "c.yaml", tiny_model, tmp / "ddp",
                       data={"train_samples": 48}, train={"max_steps": 10, "lr": 3e-3, "eval_every": 100})
    ok(harness("train", "--config", str(cfg), procs=2))
    results = {}
    for zero, extra in (("zero2", ["train.save_every=5"]), ("zero3", [])):
        results[zero] = ok(ds_harness(zero, "train", "--config", str(cfg), f"train.output_dir={tmp / zero}", *extra))
    return cfg, tmp, results


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_losses_match_ddp_for_ten_steps(runs, zero):
    cfg, tmp, results = runs
    assert "2 process(es)" in results[zero].stdout
    resolved = json.loads((tmp / zero / "deepspeed_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == int(zero[-1])
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"], resolved["train_batch_size"]) == (4, 1, 8)
    assert resolved["gradient_clipping"] == 1.0
    ddp, ds = losses(tmp / "ddp"), losses(tmp / zero)
    assert sorted(ds) == list(range(1, 11))
    for step in ds:
        assert ds[step] == pytest.approx(ddp[step], abs=1e-4), f"step {step}: ddp {ddp[step]} vs {zero} {ds[step]}"


def test_zero3_export_reloads_whole_and_reproduces_the_in_training_eval(runs):
    cfg, tmp, _ = runs
    final = tmp / "zero3" / "final"
    tensors = load_file(final / "model.safetensors")
    reference = load_file(tmp / "ddp" / "final" / "model.safetensors")
    assert tensors.keys() == reference.keys()
    assert all(tensors[k].numel() > 0 and tensors[k].shape == reference[k].shape for k in tensors), "no empty or partial tensor"
    # the same 10 steps as DDP (losses equal within 1e-4), so the gathered weights are DDP's
    assert all((tensors[k] - reference[k]).abs().max() < 1e-3 for k in tensors)
    in_training = json.loads((final / "eval_results.json").read_text())
    r = ok(harness("evaluate", "--model", str(final), "--config", str(cfg)))  # a plain single process
    reloaded = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "f1", "precision", "recall", "num_examples"):
        assert reloaded[key] == in_training[key], key
    assert reloaded["loss"] == pytest.approx(in_training["loss"], abs=1e-5)


def test_zero2_save_stop_resume_continues_with_the_same_losses(runs):
    cfg, tmp, results = runs
    ckpt = tmp / "zero2" / "checkpoints" / "step-00000005"
    assert (ckpt / "COMPLETE.json").is_file() and (ckpt / "pytorch_model").is_dir(), "DeepSpeed's sharded state"
    resumed = tmp / "zero2_resumed"
    r = ok(ds_harness("zero2", "train", "--config", str(cfg), f"train.output_dir={resumed}", f"train.resume={ckpt}"))
    assert "resumed from" in r.stdout
    straight, after = losses(tmp / "zero2"), losses(resumed)
    assert sorted(after) == list(range(6, 11))
    for step in after:
        assert after[step] == pytest.approx(straight[step], abs=1e-4)


def test_a_contradicting_deepspeed_json_is_refused_with_exit_2(tmp_path, tiny_model):
    ds_json = tmp_path / "zero2_bs4.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    launch = tmp_path / "launch.yaml"
    launch.write_text((LAUNCH / "deepspeed_zero2.yaml").read_text().replace("launch_configs/deepspeed/zero2.json", str(ds_json)))
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out", train={"per_device_batch_size": 8})
    r = ds_harness("zero2", "train", "--config", str(cfg), procs=1, launch_config=launch)
    assert r.returncode != 0 and "Traceback" not in r.stderr.split("harness: error:")[0][-2000:]
    assert f"harness: error: {ds_json}: train_micro_batch_size_per_gpu=4 contradicts train.per_device_batch_size=8" in r.stderr
    assert "exitcode  : 2" in r.stderr, "the rank exits 2; the launcher reports it (and exits 1 itself)"
