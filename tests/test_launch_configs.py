"""Every launch config in launch_configs/accelerate/ trains as shipped, through `accelerate launch`, on CPU ranks.

A config that Accelerate, DeepSpeed or torch rejects at start (such as `mixed_precision:` beside a DeepSpeed
JSON, which Accelerate refuses) fails here. The only overrides are what a 2-core machine without GPUs forces,
each named in CPU_OVERRIDES with the reason; the precision, the sharding and the JSONs are used as written.
"""

import json

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from harness.resume import loadable
from tests.helpers import REPO, launch, ok, pickles_in, plant, write_config

pytestmark = pytest.mark.slow

LAUNCH_DIR = REPO / "launch_configs" / "accelerate"
SHIPPED = sorted(LAUNCH_DIR.glob("*.yaml"))

# What a CPU machine cannot run as written, and why. Nothing else is overridden.
CPU_OVERRIDES = {
    # CPU offload of FSDP2 needs an accelerator to offload from: torch raises "Cannot access accelerator
    # device when none is available". The offload itself runs in the GPU suite (tests/gpu/).
    "fsdp2_full_shard_offload.yaml": ["--fsdp_offload_params", "false"],
}


# Resumed from a planted checkpoint end to end (the other configs' checkpoints are checked file by file): one per
# engine, DDP, DeepSpeed and FSDP2.
RESUMED_PLANTED = {"multi_gpu.yaml", "deepspeed_zero2.yaml", "fsdp2_full_shard.yaml"}


def processes(config: dict) -> int:
    # The CI machine has 2 cores: a config written for a box of 8 GPUs runs here on 2 ranks, which
    # exercises the same collectives. A one-process config stays one process.
    return 1 if int(config.get("num_processes", 1)) == 1 else 2


# name -> (distributed_type, num_processes) as shipped: a box of 8 GPUs for the multi-device configs
EXPECTED = {"cpu.yaml": ("MULTI_GPU", 2), "single_gpu.yaml": ("NO", 1), "multi_gpu.yaml": ("MULTI_GPU", 8),
            **{f"deepspeed_zero{s}.yaml": ("DEEPSPEED", 8) for s in ("1", "2", "3", "3_offload")},
            **{f"fsdp2_{k}.yaml": ("FSDP", 8) for k in ("full_shard", "shard_grad_op", "full_shard_offload")}}


def test_every_launch_config_is_covered_and_deepspeed_precision_has_one_source():
    """The one inventory of the folder: every config is known, says when to use it, loads in Accelerate as written,
    and states its precision in one place."""
    assert {p.name for p in SHIPPED} == set(EXPECTED)
    for path in SHIPPED:
        text = path.read_text()
        assert text.startswith("#"), f"{path.name} starts with a comment saying when to use it"
        config = yaml.safe_load(text)
        loaded = load_config_from_file(str(path))  # what `accelerate launch` itself reads
        assert (loaded.distributed_type, loaded.num_processes) == EXPECTED[path.name], path.name
        if config["distributed_type"] == "DEEPSPEED":
            # Accelerate refuses mixed_precision beside a DeepSpeed JSON: the JSON is the one source.
            assert "mixed_precision" not in config, path.name
            ds = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
            assert ds["bf16"]["enabled"] is True, path.name
        elif path.name != "cpu.yaml":  # the gloo debugging config runs in fp32
            assert config["mixed_precision"] == "bf16", path.name


# cpu.yaml is left out of the parametrisation only because every 2-rank test of the suite already launches it
# exactly as shipped (tests/helpers.py's `harness(..., procs=2)`).
@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name != "cpu.yaml"], ids=lambda p: p.stem)
def test_launch_config_trains_checkpoints_and_exports_as_shipped(path, tmp_path, tiny_model):
    config = yaml.safe_load(path.read_text())
    procs = processes(config)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out",
                       data={"train_samples": 32, "eval_samples": 17},
                       train={"max_steps": 3, "save_every": 2, "eval_every": 100})
    r = ok(launch(path, "train", "--config", str(cfg), procs=procs, launch_args=CPU_OVERRIDES.get(path.name, [])))
    assert f"{procs} process(es) x batch 4" in r.stdout, "the launch must start the ranks the test asked for"

    assert "mixed precision bf16" in r.stdout and "compute dtype bfloat16" in r.stdout
    kind = config["distributed_type"]
    if kind == "DEEPSPEED":
        stage = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"]
        assert f"parallelism: DeepSpeed ZeRO-{stage}" in r.stdout
        resolved = json.loads((tmp_path / "out" / "deepspeed_config.json").read_text())
        assert resolved["bf16"]["enabled"] is True and resolved["train_batch_size"] == 4 * procs
    elif kind == "FSDP":
        assert "parallelism: FSDP2" in r.stdout
        # sharded checkpoint: one torch.distributed.checkpoint file per rank
        shards = list((tmp_path / "out" / "checkpoints" / "step-00000002").glob("pytorch_model_fsdp_0/*.distcp"))
        assert len(shards) == procs
    else:
        assert "parallelism: " + ("DDP" if procs > 1 else "one process") in r.stdout
    assert (tmp_path / "out" / "checkpoints" / "step-00000002" / "COMPLETE.json").is_file()
    final = tmp_path / "out" / "final"
    assert (final / "model.safetensors").is_file() and json.loads((final / "eval_results.json").read_text())["num_examples"] == 17

    # Every pickle of this kind of checkpoint, replaced by one that runs code (its COMPLETE.json rewritten to
    # match): each is refused on every rank before any library unpickles it, and nothing runs.
    checkpoint, marker = tmp_path / "out" / "checkpoints" / "step-00000002", tmp_path / "code-ran"
    files = pickles_in(checkpoint)
    assert files, "a checkpoint holds pickles"
    kept = {p: p.read_bytes() for p in files}
    for planted in files:
        plant(planted, marker)
        for rank in range(procs):
            refusal = loadable(checkpoint, rank, procs)
            assert refusal is not None and str(planted.relative_to(checkpoint)) in str(refusal), planted
            assert "would run code when loaded" in str(refusal)
        planted.write_bytes(kept[planted])
    assert not marker.exists()
    if path.name in RESUMED_PLANTED:  # the whole way: `harness train` resuming from it, on every rank
        plant(files[-1], marker)
        r = launch(path, "train", "--config", str(cfg), f"train.resume={checkpoint}",
                   procs=procs, launch_args=CPU_OVERRIDES.get(path.name, []))
        ranks = r.stderr.split("exitcode")[0]  # what the ranks printed, before the launcher's own report
        assert r.returncode != 0 and "exitcode  : 2" in r.stderr and "Traceback" not in ranks, r.stderr[-3000:]
        assert ranks.count("would run code when loaded") == procs, "every rank refuses it, each in one line"
        assert not marker.exists(), "the planted code ran"
