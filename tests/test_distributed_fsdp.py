"""FSDP2 through `accelerate launch` with the shipped launch configs, 2 real ranks on the CPU (gloo).

The configs train as shipped (bf16) in tests/test_launch_configs.py. Loss parity with DDP needs fp32 on
both sides (bf16 parameters round differently from DDP's bf16 autocast, far beyond 1e-4), so these runs
add `--mixed_precision no`, which under FSDP is the launch config's own precision setting.
"""


import pytest
from tests.helpers import REPO, assert_export_matches, assert_same_losses, launch, losses, ok

pytestmark = pytest.mark.slow

LAUNCH = REPO / "launch_configs" / "accelerate"
FP32 = ["--mixed_precision", "no"]  # see the module docstring


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ddp_ten_steps):
    """The DDP reference's 10 steps under FSDP2 full sharding (checkpoint at step 5) and gradient/optimizer sharding."""
    cfg, ddp = ddp_ten_steps
    tmp = tmp_path_factory.mktemp("fsdp")
    results = {}
    for variant, extra in (("full_shard", ["train.save_every=5"]), ("shard_grad_op", [])):
        results[variant] = ok(launch(LAUNCH / f"fsdp2_{variant}.yaml", "train", "--config", str(cfg),
                                     f"train.output_dir={tmp / variant}", *extra, procs=2, launch_args=FP32))
    return cfg, tmp, ddp, results


@pytest.mark.parametrize("variant", ["full_shard", "shard_grad_op"])
def test_fsdp2_losses_match_ddp_for_ten_steps(runs, variant):
    cfg, tmp, ddp_out, results = runs
    out = results[variant].stdout
    assert "2 process(es)" in out and "parallelism: FSDP2" in out and "mixed precision no" in out
    ddp, fsdp = losses(ddp_out), losses(tmp / variant)
    assert sorted(fsdp) == list(range(1, 11))
    for step in fsdp:
        assert fsdp[step] == pytest.approx(ddp[step], abs=1e-4), f"step {step}: ddp {ddp[step]} vs {variant} {fsdp[step]}"


def test_fsdp2_checkpoint_is_sharded_per_rank(runs):
    _, tmp, _, _ = runs
    ckpt = tmp / "full_shard" / "checkpoints" / "step-00000005"
    assert (ckpt / "COMPLETE.json").is_file()
    assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((ckpt / "optimizer_0").glob("*.distcp"))) == 2


def test_fsdp2_export_is_gathered_whole_and_scores_the_same_after_reload(runs):
    cfg, tmp, ddp_out, _ = runs
    assert_export_matches(tmp / "full_shard" / "final", ddp_out / "final", cfg)  # the same 10 steps as DDP


def test_fsdp2_resume_continues_with_the_same_losses_and_refuses_another_world_size(runs):
    cfg, tmp, _, _ = runs
    ckpt = tmp / "full_shard" / "checkpoints" / "step-00000005"
    resumed = tmp / "resumed"
    r = ok(launch(LAUNCH / "fsdp2_full_shard.yaml", "train", "--config", str(cfg), f"train.output_dir={resumed}",
                  f"train.resume={ckpt}", procs=2, launch_args=FP32))
    assert "resumed from" in r.stdout
    assert_same_losses(tmp / "full_shard", resumed, range(6, 11))

    # Sharded optimizer state and per-rank RNG: the same world size or nothing (README, "Choosing a launch config").
    r = launch(LAUNCH / "fsdp2_full_shard.yaml", "train", "--config", str(cfg), f"train.output_dir={tmp / 'one'}",
               f"train.resume={ckpt}", procs=1, launch_args=FP32)
    assert r.returncode != 0
    assert ("harness: error: checkpoint was written by 2 processes and FSDP2 (full sharding) state is sharded per "
            "rank; resume it on 2 processes (now 1)") in r.stderr
    assert "exitcode  : 2" in r.stderr
