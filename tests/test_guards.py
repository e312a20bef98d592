"""A loss that becomes NaN stops every rank at the same step, saves nothing from the poisoned weights, and
exits 3 naming the step and the newest good checkpoint."""

import pytest

from tests.helpers import REPO, harness, launch, losses, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("procs, launch_config", [(1, None), (2, None), (2, "fsdp2_full_shard"), (2, "deepspeed_zero2")],
                         ids=["1-process", "ddp", "fsdp2", "zero2"])
def test_a_nan_loss_at_step_5_stops_before_anything_is_saved_from_it(tmp_path, tiny_model, procs, launch_config):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out, data={"train_samples": 64},
                       train={"max_steps": 12, "save_every": 3, "log_every": 4, "eval_every": 100, "best_metric": "loss"})
    # the fault on rank 0 only: the other rank's own loss stays finite, and it must stop all the same
    fault = {"HARNESS_FAULT_NONFINITE_STEP": "5", "HARNESS_FAULT_NONFINITE_RANK": "0"}
    if launch_config is None:
        r = harness("train", "--config", str(cfg), procs=procs, env=fault)
    else:  # the shipped launch config, as shipped (bf16)
        if launch_config.startswith("deepspeed"):
            pytest.importorskip("deepspeed")
        r = launch(REPO / "launch_configs" / "accelerate" / f"{launch_config}.yaml", "train", "--config", str(cfg),
                   procs=procs, env=fault)
    good = out / "checkpoints" / "step-00000003"
    line = (f"harness: error: the loss or gradient norm became non-finite at step 5; nothing was saved after it. "
            f"Newest good checkpoint: {good}; resume from it with a lower train.lr")
    assert line in r.stderr, r.stderr[-3000:]
    if procs == 1:
        assert r.returncode == 3 and "Traceback" not in r.stderr
    else:  # every rank exits 3; the launcher reports it and exits 1 itself
        assert r.returncode != 0 and r.stderr.count(line) == 2 and "exitcode  : 3" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"], "no checkpoint at step 6"
    assert not (out / "final").exists() and not (out / "best").exists()
    assert sorted(losses(out)) == [4], "step 4 was logged; the log at step 8 never happened"
