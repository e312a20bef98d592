"""FSDP2 through `accelerate launch` with the shipped launch configs, 2 real ranks on the CPU (gloo).

The configs train as shipped (bf16) in tests/test_launch_configs.py. Loss parity with DDP needs fp32 on
both sides (bf16 parameters round differently from DDP's bf16 autocast, far beyond 1e-4), so these runs
add `--mixed_precision no`, which under FSDP is the launch config's own precision setting.
"""

import json

import pytest
from tests.helpers import (REPO, assert_export_matches, assert_same_losses, assert_same_weights, harness, launch,
                           losses, ok)

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


def test_fsdp2_resume_continues_with_the_same_losses(runs):
    cfg, tmp, _, _ = runs
    ckpt = tmp / "full_shard" / "checkpoints" / "step-00000005"
    resumed = tmp / "resumed"
    r = ok(launch(LAUNCH / "fsdp2_full_shard.yaml", "train", "--config", str(cfg), f"train.output_dir={resumed}",
                  f"train.resume={ckpt}", procs=2, launch_args=FP32))
    assert "(same world size)" in r.stdout and "RNG: ranks 0-1 continue the saved streams" in r.stdout
    assert_same_losses(tmp / "full_shard", resumed, range(6, 11))


def examples(out) -> dict[int, list[int]]:
    """train.record_examples: each step's example indices in the step's global order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/examples"] for r in rows if "train/examples" in r}


def test_fsdp2_on_2_ranks_resumes_on_1_as_a_ddp_checkpoint_does(runs):
    """Written by FSDP2 on 2 ranks, resumed under the same launch config on 1 process (which holds the whole
    state: converted); the reference is DDP's step-5 checkpoint of the same run resumed on 1 process. Both take
    the same examples in the same order, and no example of the epoch is skipped or seen twice across the resume;
    the losses of the 5 steps after it agree, and so do the weights after them (the optimizer's moments and step
    counts were carried: a reset would change the first update)."""
    cfg, tmp, ddp, _ = runs
    fsdp_one, ddp_one = tmp / "fsdp2-to-one", tmp / "ddp-to-one"
    r = ok(launch(LAUNCH / "fsdp2_full_shard.yaml", "train", "--config", str(cfg), f"train.output_dir={fsdp_one}",
                  f"train.resume={tmp / 'full_shard' / 'checkpoints' / 'step-00000005'}", procs=1, launch_args=FP32))
    assert "1 process(es)" in r.stdout and "(converted from FSDP2 (full sharding) on 2 processes to one process)" in r.stdout
    assert "RNG: rank 0 continues the saved streams; the streams of rank 1 (gone) are not used" in r.stdout
    reference = ok(harness("train", "--config", str(cfg), f"train.output_dir={ddp_one}",
                           f"train.resume={ddp / 'checkpoints' / 'step-00000005'}"))
    assert "(resharded from 2 to 1 processes)" in reference.stdout
    assert examples(fsdp_one) == examples(ddp_one) and sorted(examples(fsdp_one)) == list(range(6, 11))
    before, after = examples(tmp / "full_shard"), examples(fsdp_one)
    epoch0 = [i for s in range(1, 6) for i in before[s]] + after[6] + after[7]  # 5 x 8, then 2 x 4: 48 examples
    assert sorted(epoch0) == list(range(48)), "the epoch's examples, each once across the resume"
    assert_same_losses(ddp_one, fsdp_one, range(6, 11))
    assert_same_weights(fsdp_one / "final", ddp_one / "final")


def test_ddp_on_2_ranks_resumes_under_fsdp2_on_2(runs):
    cfg, tmp, ddp, _ = runs
    out = tmp / "ddp-to-fsdp2"
    r = ok(launch(LAUNCH / "fsdp2_full_shard.yaml", "train", "--config", str(cfg), f"train.output_dir={out}",
                  f"train.resume={ddp / 'checkpoints' / 'step-00000005'}", procs=2, launch_args=FP32))
    assert "2 process(es)" in r.stdout and "(converted from DDP on 2 processes to FSDP2 (full sharding) on 2 processes)" in r.stdout
    assert {s: e for s, e in examples(ddp).items() if s > 5} == examples(out)
    assert_same_losses(ddp, out, range(6, 11))
    assert_same_weights(out / "final", ddp / "final")


def test_one_process_resumes_under_fsdp2_on_2_as_under_ddp_on_2(runs):
    """1 -> 2: a checkpoint of one process, resumed by FSDP2 on 2 ranks (converted) and by DDP on 2 ranks
    (resharded, the reference): rank 1 is new in both, and seeds its RNG from train.seed, its rank and the step."""
    cfg, tmp, _, _ = runs
    one = tmp / "one"
    ok(harness("train", "--config", str(cfg), f"train.output_dir={one}"))
    ckpt = one / "checkpoints" / "step-00000005"
    out, reference = tmp / "one-to-fsdp2", tmp / "one-to-ddp"
    r = ok(launch(LAUNCH / "fsdp2_full_shard.yaml", "train", "--config", str(cfg), f"train.output_dir={out}",
                  f"train.resume={ckpt}", procs=2, launch_args=FP32))
    assert "2 process(es)" in r.stdout and "(converted from one process to FSDP2 (full sharding) on 2 processes)" in r.stdout
    assert ("RNG: rank 0 continues the saved streams; new rank 1 starts from streams seeded by train.seed, the rank "
            "and step 5") in r.stdout
    ok(harness("train", "--config", str(cfg), f"train.output_dir={reference}", f"train.resume={ckpt}", procs=2))
    assert examples(out) == examples(reference) and sorted(examples(out)) == list(range(6, 11))
    assert_same_losses(reference, out, range(6, 11))
    assert_same_weights(out / "final", reference / "final")
