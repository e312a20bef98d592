"""`harness plan`: sizes, steps and the resolved DeepSpeed config without starting anything."""

import json
import shutil

import pytest

from harness.cli import main
from tests.helpers import REPO, harness, ok, write_config

LAUNCH = sorted((REPO / "launch_configs" / "accelerate").glob("*.yaml"))


def plan(capsys, *argv):
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("launch", LAUNCH, ids=lambda p: p.name)
def test_quickstart_plans_on_every_launch_config(launch, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = plan(capsys, "--config", "configs/quickstart.yaml", "--launch-config", str(launch),
                          f"train.output_dir={tmp_path / 'q'}")
    assert code == 0, err
    assert "steps" in out and "train 1024 of 4000" in out
    assert ("DeepSpeed" in out) == ("deepspeed" in launch.name)


def test_reference_recipe_on_two_nodes_of_eight_gpus_with_zero2(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    code, out, err = plan(capsys, "--config", "configs/bert_base_imdb.yaml",
                          "--launch-config", "launch_configs/accelerate/deepspeed_zero2.yaml",
                          "data.train_samples=25000", "data.eval_samples=25000", f"train.output_dir={tmp_path / 'b'}")
    assert code == 0, err
    assert "2 node(s) x 8 process(es) = 16 processes  [Slurm job 77]" in out
    assert "8 per device x 1 accumulation x 16 = 128 per optimizer step" in out
    assert "196 per epoch, 588 in total (3.00 epochs), warmup 500" in out
    ds = json.loads(out.split("deepspeed       ", 1)[1])
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["bf16"]["enabled"]) == (128, 8, True)


def test_command_line_world_size_and_get(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code, out, _ = plan(capsys, "--config", "configs/quickstart.yaml", "--nodes", "2", "--gpus-per-node", "4",
                        f"train.output_dir={tmp_path / 'q'}")
    assert code == 0 and "2 node(s) x 4 process(es) = 8 processes  [command line]" in out
    code, out, _ = plan(capsys, "--config", "configs/quickstart.yaml", "--get", "train.output_dir")
    assert code == 0 and out.strip() == "outputs/quickstart"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["train.warmup_steps=100"], "train.warmup_steps=100 is longer than the run (16 optimizer steps)"),
        (["train.save_every=50"], "train.save_every=50 is longer than the run (16 optimizer steps): no checkpoint would be written"),
        (["--nodes", "8", "--gpus-per-node", "8"], "global batch 256 (per-device 4 x accumulation 1 x 64 processes) is larger than the training set (64)"),
    ],
)
def test_what_would_break_a_long_job_late_is_refused(extra, fragment, capsys, monkeypatch, tmp_path, tiny_model):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out", train={"epochs": 1})
    code, _, err = plan(capsys, "--config", str(cfg), *extra)
    assert code == 2 and err.strip() == f"harness: error: {fragment}"


def test_a_contradicting_deepspeed_json_and_an_uneven_launch_config(capsys, monkeypatch, tmp_path, tiny_model):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    launch = tmp_path / "launch.yaml"
    launch.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\nnum_processes: 2\n")
    code, _, err = plan(capsys, "--config", str(cfg), "--launch-config", str(launch))
    assert code == 2 and err.strip() == f"harness: error: {ds}: gradient_clipping=0.5 contradicts train.max_grad_norm=1.0; set it to \"auto\" or make them agree"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    code, _, err = plan(capsys, "--config", str(cfg), "--launch-config", str(launch))
    assert code == 2 and "defines its own 'optimizer'" in err
    launch.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 3\n")
    code, _, err = plan(capsys, "--config", str(cfg), "--launch-config", str(launch))
    assert code == 2 and "num_processes=3 does not divide over num_machines=2" in err


def test_an_output_folder_holding_another_run_is_refused(capsys, monkeypatch, tmp_path, tiny_model):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out)
    (out / "config.yaml").write_text("train:\n  lr: 0.5\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.7}\n')  # it trained (a config alone is replaced)
    code, _, err = plan(capsys, "--config", str(cfg))
    assert code == 2 and "holds a run of a different config" in err


def test_a_local_model_whose_config_cannot_be_read_is_refused(capsys, monkeypatch, tmp_path, tiny_model):
    """A hub model offline and uncached only loses the FLOP estimate; a local folder with a broken config.json
    is the user's file, which the job would stop on: plan said nothing of it before."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    cfg = write_config(tmp_path / "c.yaml", model, tmp_path / "out")
    code, _, err = plan(capsys, "--config", str(cfg))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"harness: error: cannot load model from '{model}': ")


def test_an_unreachable_hub_dataset_says_how_to_plan_without_it(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, _, err = plan(capsys, "--config", "configs/bert_base_imdb.yaml")
    assert code == 2 and "set data.train_samples and data.eval_samples" in err


def test_a_launch_config_that_accelerate_refuses_is_refused_before_any_launch(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "launch_configs" / "accelerate" / "multi_gpu.yaml").read_text() + "num_gpus_typo: 8\n")
    code, _, err = plan(capsys, "--config", "configs/quickstart.yaml", "--launch-config", str(bad))
    assert code == 2 and err.startswith(f"harness: error: --launch-config {bad}: accelerate cannot use it:")
    assert "num_gpus_typo" in err and err.count("\n") == 1
    ds = tmp_path / "ds.yaml"  # pitfall 20: mixed_precision beside a DeepSpeed JSON
    ds.write_text((REPO / "launch_configs" / "accelerate" / "deepspeed_zero2.yaml").read_text() + "mixed_precision: bf16\n")
    code, _, err = plan(capsys, "--config", "configs/quickstart.yaml", "--launch-config", str(ds))
    assert code == 2 and "also sets mixed_precision, which Accelerate refuses at start" in err


def test_plan_describes_fsdp2_and_deepspeed_precision_from_the_json(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    code, out, _ = plan(capsys, "--config", "configs/quickstart.yaml", "--launch-config",
                        "launch_configs/accelerate/fsdp2_shard_grad_op.yaml", f"train.output_dir={tmp_path / 'q'}")
    assert code == 0 and "parallelism     FSDP2 (gradient/optimizer sharding)" in out and "precision       bf16 (from the launch config)" in out
    code, out, _ = plan(capsys, "--config", "configs/quickstart.yaml", "--launch-config",
                        "launch_configs/accelerate/deepspeed_zero3_offload.yaml", f"train.output_dir={tmp_path / 'q'}")
    assert code == 0 and "parallelism     DeepSpeed ZeRO-3 (offload: optimizer, param)" in out
    assert "precision       bf16 (from launch_configs/deepspeed/zero3_offload.json)" in out


@pytest.mark.slow
def test_plan_says_what_a_resume_will_do_on_the_launch_it_is_given(capsys, monkeypatch, tmp_path, tiny_model):
    """A 2-rank DDP run, as if preempted after its step-4 checkpoint: resumed on 2 or 1 processes, under FSDP2,
    or refused under DeepSpeed ZeRO, in the plan's one line, as `train` would do it."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, run, data={"train_samples": 48},
                       train={"max_steps": 4, "eval_every": 2, "save_every": 4})
    assert "2 process(es)" in ok(harness("train", "--config", str(cfg), procs=2)).stdout
    shutil.rmtree(run / "final")
    monkeypatch.chdir(REPO)
    fsdp2 = str(REPO / "launch_configs" / "accelerate" / "fsdp2_full_shard.yaml")
    for launch, procs, expected in ((None, 2, "(same world size)"), (None, 1, "(resharded from 2 to 1 processes)"),
                                    (fsdp2, 2, "(converted from DDP on 2 processes to FSDP2 (full sharding) on 2 processes)")):
        world = ["--launch-config", launch] if launch else []
        code, out, err = plan(capsys, "--config", str(cfg), *world, "--nodes", "1", "--gpus-per-node", str(procs))
        assert code == 0, err
        assert f"resume from {run / 'checkpoints' / 'step-00000004'} {expected}" in out
    zero2 = str(REPO / "launch_configs" / "accelerate" / "deepspeed_zero2.yaml")
    code, out, err = plan(capsys, "--config", str(cfg), "--launch-config", zero2, "--nodes", "1", "--gpus-per-node", "4")
    assert code == 0 and "(converted from DDP on 2 processes to DeepSpeed ZeRO-2 on 4 processes)" in out, err

    # as an FSDP1 launch config would have written it: a layout harness does not convert
    ckpt = run / "checkpoints" / "step-00000004"
    progress = json.loads((ckpt / "progress.json").read_text())
    (ckpt / "progress.json").write_text(json.dumps({**progress, "sharding": "FSDP1 (full sharding)"}))
    manifest = json.loads((ckpt / "COMPLETE.json").read_text())
    manifest["files"]["progress.json"] = (ckpt / "progress.json").stat().st_size
    (ckpt / "COMPLETE.json").write_text(json.dumps(manifest))
    code, out, err = plan(capsys, "--config", str(cfg), "--launch-config", zero2)
    assert code == 2 and err.count("\n") == 1
    assert ("checkpoint was written by 2 processes under FSDP1 (full sharding) on 2 processes; harness resumes FSDP1 "
            "state only under FSDP1 on 2 processes") in err
