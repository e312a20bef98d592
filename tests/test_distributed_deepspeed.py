"""DeepSpeed ZeRO-2/3 through `accelerate launch` with the shipped launch configs, 2 real ranks on the CPU.

The configs train as shipped (bf16) in tests/test_launch_configs.py. Here the question is whether ZeRO
computes what DDP computes, which needs fp32 on both sides (bf16 weights round differently from DDP's
bf16 autocast, far beyond 1e-4): each run uses a copy of the shipped JSON whose only change is
`bf16.enabled: false`, since under DeepSpeed the JSON, not `--mixed_precision`, decides the precision.
"""

import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
from tests.helpers import (REPO, assert_export_matches, assert_same_losses, assert_same_weights, harness, launch, losses,
                           ok, plant, write_config)

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional dependency: pip install -e '.[deepspeed]'")
pytestmark = pytest.mark.slow

LAUNCH = REPO / "launch_configs" / "accelerate"


def fp32_launch_config(zero: str, folder):
    """The shipped launch config and JSON for `zero`, with bf16 turned off in the JSON (see the module doc)."""
    ds = json.loads((REPO / "launch_configs" / "deepspeed" / f"{zero}.json").read_text())
    ds["bf16"] = {"enabled": False}
    (folder / f"{zero}_fp32.json").write_text(json.dumps(ds))
    shipped = (LAUNCH / f"deepspeed_{zero}.yaml").read_text()
    path = folder / f"deepspeed_{zero}_fp32.yaml"
    path.write_text(shipped.replace(f"launch_configs/deepspeed/{zero}.json", str(folder / f"{zero}_fp32.json")))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ddp_ten_steps):
    """The same 10 steps (2 ranks x batch 4, fp32, same seed and data) under DDP, ZeRO-2 and ZeRO-3."""
    cfg, ddp = ddp_ten_steps
    tmp = tmp_path_factory.mktemp("ds")
    results = {}
    for zero, extra in (("zero2", ["train.save_every=5"]), ("zero3", [])):
        results[zero] = ok(launch(fp32_launch_config(zero, tmp), "train", "--config", str(cfg),
                                  f"train.output_dir={tmp / zero}", *extra, procs=2))
    return cfg, tmp, ddp, results


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_losses_match_ddp_for_ten_steps(runs, zero):
    cfg, tmp, ddp_out, results = runs
    assert "2 process(es)" in results[zero].stdout
    resolved = json.loads((tmp / zero / "deepspeed_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == int(zero[-1])
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"], resolved["train_batch_size"]) == (4, 1, 8)
    assert resolved["gradient_clipping"] == 1.0
    ddp, ds = losses(ddp_out), losses(tmp / zero)
    assert sorted(ds) == list(range(1, 11))
    for step in ds:
        assert ds[step] == pytest.approx(ddp[step], abs=1e-4), f"step {step}: ddp {ddp[step]} vs {zero} {ds[step]}"


def test_zero3_export_reloads_whole_and_reproduces_the_in_training_eval(runs):
    cfg, tmp, ddp_out, _ = runs
    # the same 10 steps as DDP (losses equal within 1e-4), so the gathered weights are DDP's
    assert_export_matches(tmp / "zero3" / "final", ddp_out / "final", cfg)


def test_zero2_save_stop_resume_continues_with_the_same_losses(runs):
    cfg, tmp, _, results = runs
    ckpt = tmp / "zero2" / "checkpoints" / "step-00000005"
    assert (ckpt / "COMPLETE.json").is_file() and (ckpt / "pytorch_model").is_dir(), "DeepSpeed's sharded state"
    resumed = tmp / "zero2_resumed"
    r = ok(launch(tmp / "deepspeed_zero2_fp32.yaml", "train", "--config", str(cfg), f"train.output_dir={resumed}",
                  f"train.resume={ckpt}", procs=2))
    assert "resumed from" in r.stdout and "(same world size)" in r.stdout
    assert_same_losses(tmp / "zero2", resumed, range(6, 11))



def examples(out) -> dict[int, list[int]]:
    """train.record_examples: each step's example indices in the step's global order."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/examples"] for r in rows if "train/examples" in r}


def digest(folder):
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def ddp_resumed(runs):
    """The references on the other world size: DDP's step-5 checkpoint of the 2-rank run resumed on 1 process, and
    a 1-process DDP run's step-5 checkpoint resumed on 2 ranks."""
    cfg, tmp, ddp, _ = runs
    one = tmp / "ddp-one"
    ok(harness("train", "--config", str(cfg), f"train.output_dir={tmp / 'ddp-2-to-1'}",
               f"train.resume={ddp / 'checkpoints' / 'step-00000005'}"))
    ok(harness("train", "--config", str(cfg), f"train.output_dir={one}"))
    ok(harness("train", "--config", str(cfg), f"train.output_dir={tmp / 'ddp-1-to-2'}",
               f"train.resume={one / 'checkpoints' / 'step-00000005'}", procs=2))
    return {"2-to-1": tmp / "ddp-2-to-1", "1-to-2": tmp / "ddp-1-to-2"}


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_on_2_ranks_resumes_on_1_through_a_universal_copy_as_ddp_does(runs, ddp_resumed, zero):
    """ZeRO on 2 ranks, resumed on 1 process: harness converts the partitions to DeepSpeed's universal layout
    beside the checkpoint (never in it) and loads that. The reference is the DDP run's step-5 checkpoint resumed
    on 1 process: the same examples after the resume, each of the epoch's once across it, the same losses for 5
    steps and the same weights after them (moments and step counts carried; DeepSpeed's own universal load gives
    ZeRO-3's groups one shared step tensor and the first group's weight decay, which harness undoes: uncorrected,
    the weights differ by up to 2e-4)."""
    cfg, tmp, _, _ = runs
    ckpt = tmp / zero / "checkpoints" / "step-00000005"
    before = digest(ckpt)
    out, reference = tmp / f"{zero}-to-one", ddp_resumed["2-to-1"]
    r = ok(launch(tmp / f"deepspeed_{zero}_fp32.yaml", "train", "--config", str(cfg), f"train.output_dir={out}",
                  f"train.resume={ckpt}", procs=1))
    assert "1 process(es)" in r.stdout
    assert "(resharded from 2 to 1 processes through DeepSpeed's universal checkpoint)" in r.stdout
    assert "RNG: rank 0 continues the saved streams; the streams of rank 1 (gone) are not used" in r.stdout
    copy = tmp / zero / "checkpoints" / "universal-step-00000005"
    assert (copy / "COMPLETE.json").is_file() and (copy / "pytorch_model" / "zero").is_dir()
    assert digest(ckpt) == before, "the checkpoint itself is untouched"
    assert examples(out) == examples(reference) and sorted(examples(out)) == list(range(6, 11))
    epoch0 = [i for s in range(1, 6) for i in examples(tmp / zero)[s]] + examples(out)[6] + examples(out)[7]
    assert sorted(epoch0) == list(range(48)), "the epoch's examples, each once across the resume"
    assert_same_losses(reference, out, range(6, 11))
    assert_same_weights(out / "final", reference / "final")


def test_a_universal_copy_is_reused_and_checked_like_any_checkpoint_file(runs):
    cfg, tmp, _, _ = runs
    ckpt = tmp / "zero2-own" / "checkpoints" / "step-00000005"  # its own: the copy beside it gets a planted file
    shutil.copytree(tmp / "zero2" / "checkpoints" / "step-00000005", ckpt)
    copy = ckpt.parent / "universal-step-00000005"
    first, again = tmp / "zero2-reuse-1", tmp / "zero2-reuse-2"
    for out in (first, again):
        ok(launch(tmp / "deepspeed_zero2_fp32.yaml", "train", "--config", str(cfg), f"train.output_dir={out}",
                  f"train.resume={ckpt}", "train.max_steps=6", procs=1))
        if out == first:
            converted = (copy / "COMPLETE.json").stat().st_mtime_ns
    assert (copy / "COMPLETE.json").stat().st_mtime_ns == converted, "the verified copy is reused"
    assert losses(again) == losses(first)

    # one that would run code is refused, before anything loads it
    marker = tmp / "planted-ran"
    plant(next((copy / "pytorch_model" / "zero").glob("*/exp_avg.pt")), marker)
    r = launch(tmp / "deepspeed_zero2_fp32.yaml", "train", "--config", str(cfg), f"train.output_dir={tmp / 'planted'}",
               f"train.resume={ckpt}", procs=1)
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr and not marker.exists()
    assert "converted checkpoint" in r.stderr and "exp_avg.pt" in r.stderr


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_of_one_process_resumes_on_2_ranks_as_ddp_does(runs, ddp_resumed, zero):
    """1 -> 2: a one-process ZeRO checkpoint, resumed on 2 ranks through the universal copy, against a one-process
    DDP checkpoint of the same run resumed on 2 ranks; rank 1 is new in both."""
    cfg, tmp, _, _ = runs
    one = tmp / f"{zero}-one"
    assert "1 process(es)" in ok(launch(tmp / f"deepspeed_{zero}_fp32.yaml", "train", "--config", str(cfg),
                                        f"train.output_dir={one}", procs=1)).stdout
    out, reference = tmp / f"{zero}-one-to-2", ddp_resumed["1-to-2"]
    r = ok(launch(tmp / f"deepspeed_{zero}_fp32.yaml", "train", "--config", str(cfg), f"train.output_dir={out}",
                  f"train.resume={one / 'checkpoints' / 'step-00000005'}", procs=2))
    assert "2 process(es)" in r.stdout
    assert "(resharded from 1 to 2 processes through DeepSpeed's universal checkpoint)" in r.stdout
    assert "new rank 1 starts from streams seeded by train.seed, the rank and step 5" in r.stdout
    assert examples(out) == examples(reference) and sorted(examples(out)) == list(range(6, 11))
    assert_same_losses(reference, out, range(6, 11))
    assert_same_weights(out / "final", reference / "final")


@pytest.mark.parametrize("written, resumed", [("zero2", "fsdp2_full_shard"), ("ddp", "zero3"), ("zero2", "zero3")])
def test_a_checkpoint_resumes_under_another_parallelism_as_if_uninterrupted(runs, written, resumed):
    """Across parallelism modes through the consolidated state, on 2 ranks: the step-5 checkpoint of one run,
    resumed under another launch config, against the uninterrupted DDP run (which ZeRO-2 matches within 1e-4):
    the same examples, losses for 5 steps and weights after them."""
    cfg, tmp, ddp, _ = runs
    ckpt = (ddp if written == "ddp" else tmp / written) / "checkpoints" / "step-00000005"
    if resumed.startswith("fsdp2"):
        launch_config, extra = LAUNCH / f"{resumed}.yaml", ["--mixed_precision", "no"]  # fp32, as in its own module
    else:
        launch_config, extra = tmp / f"deepspeed_{resumed}_fp32.yaml", []
    out = tmp / f"{written}-to-{resumed}"
    r = ok(launch(launch_config, "train", "--config", str(cfg), f"train.output_dir={out}", f"train.resume={ckpt}",
                  procs=2, launch_args=extra))
    words = {"zero2": "DeepSpeed ZeRO-2 on 2 processes", "zero3": "DeepSpeed ZeRO-3 on 2 processes",
             "ddp": "DDP on 2 processes", "fsdp2_full_shard": "FSDP2 (full sharding) on 2 processes"}
    assert "2 process(es)" in r.stdout and f"(converted from {words[written]} to {words[resumed]})" in r.stdout
    assert "RNG: ranks 0-1 continue the saved streams" in r.stdout
    assert examples(out) == {s: e for s, e in examples(ddp).items() if s > 5}
    assert_same_losses(ddp, out, range(6, 11))
    assert_same_weights(out / "final", ddp / "final")


def test_the_consolidated_state_is_the_same_whatever_wrote_the_checkpoint(runs, tmp_path):
    """The step-5 checkpoints of the same 5 steps under DDP, ZeRO-2 and ZeRO-3, each read into harness's
    consolidated form (ZeRO's through a universal copy): the same weights, Adam moments and step counts, the same
    parameter groups and the same schedule."""
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification

    from harness.consolidate import read_state
    from harness.optim import build_optimizer
    from harness.resume import universal_copy

    cfg, tmp, ddp, _ = runs
    model = AutoModelForSequenceClassification.from_pretrained(yaml.safe_load(cfg.read_text())["model"]["name_or_path"])
    optimizer = build_optimizer(model, 3e-3, 0.01)
    one = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)  # as the main process alone
    states = {"DDP": read_state(ddp / "checkpoints" / "step-00000005", "DDP", model, optimizer)}
    for zero, family in (("zero2", "ZeRO-1/2"), ("zero3", "ZeRO-3")):
        ckpt = tmp / zero / "checkpoints" / "step-00000005"
        shapes = {n: p.shape for n, p in model.named_parameters()}
        states[zero] = read_state(ckpt, family, model, optimizer, universal_copy(one, ckpt), shapes)
    reference = states.pop("DDP")
    assert set(reference.model) >= {n for n, _ in model.named_parameters()}
    for zero, state in states.items():
        for name, weight in state.model.items():
            assert torch.allclose(weight, reference.model[name], atol=1e-6), f"{zero}: {name}"
            saved, expected = state.optimizer["state"][name], reference.optimizer["state"][name]
            assert float(saved["step"]) == float(expected["step"]) == 5
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(saved[key], expected[key], atol=1e-6, rtol=1e-4), f"{zero}: {name} {key}"
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in state.optimizer["param_groups"]]
        assert groups == [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                          for g in reference.optimizer["param_groups"]]
        assert state.scheduler == reference.scheduler


def test_a_contradicting_deepspeed_json_is_refused_with_exit_2(tmp_path, tiny_model):
    ds_json = tmp_path / "zero2_bs4.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    launch_config = tmp_path / "launch.yaml"
    launch_config.write_text((LAUNCH / "deepspeed_zero2.yaml").read_text().replace("launch_configs/deepspeed/zero2.json", str(ds_json)))
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out", train={"per_device_batch_size": 8})
    r = launch(launch_config, "train", "--config", str(cfg), procs=1)
    assert r.returncode != 0 and "Traceback" not in r.stderr.split("harness: error:")[0][-2000:]
    assert f"harness: error: {ds_json}: train_micro_batch_size_per_gpu=4 contradicts train.per_device_batch_size=8" in r.stderr
    assert "exitcode  : 2" in r.stderr, "the rank exits 2; the launcher reports it (and exits 1 itself)"


def test_a_shipped_deepspeed_launch_config_started_outside_the_repository_says_where_it_looked(tmp_path, tiny_model):
    """The shipped launch configs name their JSON relative to the repository root, and Accelerate reads it from the
    current directory: started elsewhere, the rank and `harness plan` exit 2 naming the file and the directory,
    where Accelerate alone raised a traceback about base64; nothing is written."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "out")
    expected = ("harness: error: DeepSpeed config file not found: launch_configs/deepspeed/zero2.json "
                f"(relative to the current directory, {tmp_path}")
    r = launch(LAUNCH / "deepspeed_zero2.yaml", "train", "--config", str(cfg), procs=1, cwd=tmp_path)
    assert r.returncode != 0 and expected in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("harness: error:")[0][-2000:] and "exitcode  : 2" in r.stderr
    assert not (tmp_path / "out").exists()
    p = harness("plan", "--config", str(cfg), "--launch-config", str(LAUNCH / "deepspeed_zero2.yaml"), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [expected + ": launch from the repository root)"]
