"""The GPU suite: every shipped launch config, as shipped, on the GPUs of this machine (one is enough).

    python -m pytest -v tests/gpu -n 10 --junitxml=gpu-suite.xml   # -n: pytest-xdist, configs side by side
    python -m pytest -v tests/gpu -k zero2                         # one launch config

Skipped where CUDA is absent. Per launch config: a run that checkpoints, is stopped by SIGUSR1 and exits 0;
`resume=auto` finishes it; the final export is scored again by `harness evaluate`; the compute dtype is
bf16; `harness plan` states the same steps and global batch as the run. Nothing assumes one process: a
config written for N GPUs runs on min(N, GPUs here) processes. A tiny BERT with its own WordPiece
vocabulary is built in-process, so the suite needs no network and no model package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU suite needs a CUDA GPU (none is visible here)"),
]

REPO = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO / "launch_configs" / "accelerate"
# cpu.yaml is the no-GPU debugging config (gloo ranks); it runs in the CPU suite, tests/test_launch_configs.py.
GPU_CONFIGS = sorted(p for p in LAUNCH_DIR.glob("*.yaml") if p.name != "cpu.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random BERT classifier, its vocabulary covering the synthetic reviews written
    beside it as train.parquet and test.parquet."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    import pandas as pd

    from harness.sources import synthetic_rows

    out = tmp_path_factory.mktemp("tiny-bert")
    words = set()
    for split in ("train", "test"):
        rows = synthetic_rows(split)
        # the recipe reads these files (data.dataset=<folder>), the way users' local data is read
        pd.DataFrame(rows).to_parquet(out / f"{split}.parquet")
        for text in rows["text"]:
            words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def recipe(path: Path, model: Path, out: Path) -> Path:
    cfg = {
        "model": {"name_or_path": str(model), "num_labels": 2},
        "data": {"dataset": str(model), "max_length": 64, "train_samples": 512, "eval_samples": 200},
        "train": {"output_dir": str(out), "max_steps": 200, "per_device_batch_size": 8, "lr": 1e-3,
                  "save_every": 5, "keep_last": 2, "log_every": 5, "eval_every": 200, "seed": 3},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def processes(launch_config: Path) -> int:
    wanted = int(yaml.safe_load(launch_config.read_text()).get("num_processes", 1))
    return max(1, min(wanted, torch.cuda.device_count()))


def launch_cmd(launch_config: Path, procs: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
            "--num_processes", str(procs), "--main_process_port", str(free_port()), "-m", "harness", *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def training_ranks(proc: subprocess.Popen, procs: int) -> list:
    import psutil

    # the processes that run `-m harness train`, not the launcher (whose own command line names harness too)
    deadline, found = time.time() + 60, {}
    while len(found) < procs and time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmd = " ".join(child.cmdline())
                if "harness" in cmd and "accelerate.commands.launch" not in cmd:
                    found[child.pid] = child
            except psutil.Error:
                continue
        time.sleep(0.05)
    assert len(found) == procs, f"found {len(found)} training processes, expected {procs}"
    return list(found.values())


@pytest.mark.parametrize("launch_config", GPU_CONFIGS, ids=lambda p: p.stem)
def test_launch_config_runs_as_shipped_on_gpu(launch_config, tmp_path, tiny_bert):
    procs = processes(launch_config)
    out = tmp_path / "run"
    cfg = recipe(tmp_path / "c.yaml", tiny_bert, out)

    # 1. train until the first checkpoint is complete, then SIGUSR1 (what Slurm sends before the time limit)
    proc = subprocess.Popen(launch_cmd(launch_config, procs, "train", "--config", str(cfg)), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = out / "checkpoints" / "step-00000005" / "COMPLETE.json"
        deadline = time.time() + 180
        while not first.is_file():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.communicate()[1][-5000:]}"
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        for rank in training_ranks(proc, procs):
            rank.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-5000:]
    stopped = re.search(r"stopped by a signal at step (\d+)", stdout)
    assert stopped and 5 <= int(stopped.group(1)) < 200, stdout[-3000:]
    assert not (out / "final").exists()

    # 2. what ran: processes, parallelism, bf16 really in the forward
    assert f"{procs} process(es) x batch 8" in stdout
    assert "compute dtype bfloat16" in stdout, "the launch config's bf16 must reach the model's forward"
    assert "on cuda, mixed precision bf16" in stdout
    kind = yaml.safe_load(launch_config.read_text())["distributed_type"]
    assert {"DEEPSPEED": "parallelism: DeepSpeed ZeRO", "FSDP": "parallelism: FSDP2"}.get(kind, "parallelism: ") in stdout

    # 3. resume=auto finishes the run from the signal's checkpoint
    resumed = run(launch_cmd(launch_config, procs, "train", "--config", str(cfg)))
    assert f"resumed from {out / 'checkpoints' / ('step-%08d' % int(stopped.group(1)))}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 200 and (out / "final" / "model.safetensors").is_file()
    # train.cuda_graphs=auto (the default): one process without DeepSpeed or FSDP replays its steps as CUDA graphs
    if procs == 1 and kind not in ("DEEPSPEED", "FSDP"):
        assert re.search(r"CUDA graphs: [1-9]\d* captured", resumed.stdout), resumed.stdout[-3000:]
    else:
        assert "train.cuda_graphs=auto: the steps run eagerly" in resumed.stdout, resumed.stdout[-3000:]

    # 4. the export reloads in a plain process (from_pretrained) and scores as it did in training
    in_training = json.loads((out / "final" / "eval_results.json").read_text())
    ev = run([sys.executable, "-m", "harness", "evaluate", "--model", str(out / "final"), "--config", str(cfg)])
    again = json.loads(ev.stdout.strip().splitlines()[-1])
    assert again["num_examples"] == in_training["num_examples"] == 200
    assert abs(again["accuracy"] - in_training["accuracy"]) <= 0.02, (again, in_training)  # bf16 vs fp32 ties
    assert again["loss"] == pytest.approx(in_training["loss"], abs=2e-2)

    # 5. `harness plan` agrees with the run: global batch, steps per epoch, total steps
    plan = run([sys.executable, "-m", "harness", "plan", "--config", str(cfg), "--launch-config", str(launch_config),
                "--nodes", "1", "--gpus-per-node", str(procs)]).stdout
    batch = re.search(r"= (\d+) per optimizer step", plan).group(1)
    per_epoch, total = re.search(r"(\d+) per epoch, (\d+) in total", plan).groups()
    assert f"= {batch} per step; {per_epoch} steps/epoch, {total} steps" in stdout


def test_a_training_step_makes_no_host_synchronisation(tmp_path, tiny_bert):
    """Between log steps the loop must not wait for the GPU: `train.sync_debug=true` turns on
    torch.cuda.set_sync_debug_mode('warn') around the steps (not the log, eval or save points) and the
    run reports how many synchronisations it saw."""
    cfg = recipe(tmp_path / "c.yaml", tiny_bert, tmp_path / "run")
    r = run([sys.executable, "-m", "harness", "train", "--config", str(cfg), "train.max_steps=30",
             "train.save_every=null", "train.log_every=10", "train.sync_debug=true",
             "train.cuda_graphs=false"])  # the eager steps (the step_graphs cases below check the graphs' replays)
    assert "host synchronisations inside training steps: 0" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


MASTER = "bf16 weights, fp32 master weights"
# Each case states everything its run must print: the precision; whether whole steps were captured as CUDA graphs;
# how many graphs torch.compile built (None: not compiled; every compiled case must have 0 graph breaks); the host
# synchronisations counted inside steps (None where a compile mode records CUDA graphs, which synchronises by design);
# and, for compile modes that record CUDA graphs, that none was skipped. The eager cases say train.cuda_graphs=false:
# its default (auto) would capture their steps on one GPU.
SINGLE_GPU_CASES = {
    "master_weights": (["train.bf16_mode=master_weights", "train.cuda_graphs=false"],
                       dict(precision=MASTER, captured=False, compiled=None, syncs=0, skips=None)),
    "autocast": (["train.bf16_mode=autocast", "train.cuda_graphs=false"],
                 dict(precision="bf16", captured=False, compiled=None, syncs=0, skips=None)),
    "unpadded": (["model.unpadded=true"], dict(precision=MASTER, captured=False, compiled=None, syncs=0, skips=None)),
    "cudagraphs": (["train.compile=true", "train.compile_mode=reduce-overhead"],
                   dict(precision=MASTER, captured=False, compiled=(1, 1), syncs=None, skips=0)),
    "cudagraphs_layers": (["train.compile=true", "train.compile_mode=reduce-overhead", "train.compile_scope=layers"],
                          dict(precision=MASTER, captured=False, compiled=(1, 1), syncs=None, skips=0)),
    # one graph; a second where inductor's kernels guard on a range of packed lengths
    "unpadded_master_layers": (["model.unpadded=true", "train.bf16_mode=master_weights", "train.compile=true",
                                "train.compile_scope=layers"],
                               dict(precision=MASTER, captured=False, compiled=(1, 2), syncs=None, skips=None)),
    "step_graphs": (["train.cuda_graphs=true"], dict(precision=MASTER, captured=True, compiled=None, syncs=0, skips=None)),
    "step_graphs_autocast": (["train.cuda_graphs=true", "train.bf16_mode=autocast"],
                             dict(precision="bf16", captured=True, compiled=None, syncs=0, skips=None)),
    "step_graphs_layers": (["train.cuda_graphs=true", "train.compile=true", "train.compile_scope=layers"],
                           dict(precision=MASTER, captured=True, compiled=(1, 1), syncs=None, skips=None)),
}


@pytest.mark.parametrize("case", SINGLE_GPU_CASES)
def test_precision_unpadded_compile_and_cuda_graphs_train_on_the_single_gpu_config(tmp_path, tiny_bert, case):
    """The speed options on the shipped single-GPU config (bf16): bf16 weights with fp32 masters, unpadded (packed)
    batches through FlashAttention's varlen kernel, compiled models (whole or by layers, with CUDA graphs of
    inductor's), unpadded batches through layers compiled with the FlashAttention call, and whole steps captured as
    CUDA graphs; all export a model that `harness evaluate` scores as training did."""
    overrides, want = SINGLE_GPU_CASES[case]
    cfg = recipe(tmp_path / "c.yaml", tiny_bert, tmp_path / "run")
    r = run(launch_cmd(LAUNCH_DIR / "single_gpu.yaml", 1, "train", "--config", str(cfg), "train.max_steps=30",
                       "train.save_every=null", "train.log_every=10", "train.sync_debug=true", *overrides), timeout=400)
    said = r.stdout[-3000:] + r.stderr[-3000:]
    assert "compute dtype bfloat16" in r.stdout and f"mixed precision {want['precision']}" in r.stdout, said
    captured = re.search(r"CUDA graphs: (\d+) captured .* (\d+) step\(s\) replayed", r.stdout)
    assert bool(captured) == want["captured"], said
    assert not want["captured"] or (int(captured.group(1)) >= 1 and int(captured.group(2)) >= 10), said
    assert "could not be captured" not in r.stdout, said
    compiled = re.search(r"torch.compile: (\d+) graph\(s\) compiled, (\d+) graph break\(s\)", r.stdout)
    assert bool(compiled) == (want["compiled"] is not None), said
    if compiled:
        low, high = want["compiled"]
        assert low <= int(compiled.group(1)) <= high and compiled.group(2) == "0", said
    syncs = re.search(r"host synchronisations inside training steps: (\d+)", r.stdout)
    assert syncs, said
    assert want["syncs"] is None or int(syncs.group(1)) == want["syncs"], said
    skipped = re.search(r"CUDA graphs skipped for (\d+) compiled graph\(s\)", r.stdout)
    if want["skips"] is None:
        assert not skipped, said
    else:  # a skipped CUDA graph still trains (compiled, without the graph): only the report tells
        assert skipped and int(skipped.group(1)) == want["skips"], said
    final = tmp_path / "run" / "final"
    again = json.loads(run([sys.executable, "-m", "harness", "evaluate", "--model", str(final), "--config", str(cfg)])
                       .stdout.strip().splitlines()[-1])
    in_training = json.loads((final / "eval_results.json").read_text())
    assert again["num_examples"] == 200 and abs(again["accuracy"] - in_training["accuracy"]) <= 0.02, (again, in_training)


def test_unpadded_attention_runs_flash_varlen_and_matches_masked_sdpa_in_bf16():
    """model.unpadded's GPU kernel: bf16 inputs take FlashAttention's variable-length kernel, called directly (not
    through nested tensors, whose host cost is milliseconds per call), and its outputs and gradients agree
    with padded, masked SDPA within bf16's tolerance."""
    from harness.attention import packed_attention, packed_kernel

    torch.manual_seed(0)
    lengths, heads, size = [300, 7, 512, 64, 64, 1], 12, 64
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    leaves = [torch.randn(1, sum(lengths), heads, size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]
    qkv = [x.transpose(1, 2) for x in leaves]
    assert packed_kernel(qkv[0]) == "flash" and packed_kernel(qkv[0].float()) == "jagged"
    out = packed_attention(*qkv, offsets, max(lengths), kernel="flash")
    weights = torch.randn_like(out)
    (out.float() * weights).sum().backward()

    width, bounds = max(lengths), offsets.tolist()
    padded = [torch.zeros(len(lengths), heads, width, size, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for i, (a, n) in enumerate(zip(bounds, lengths)):
        for p, x in zip(padded, qkv):
            p[i, :, :n] = x[0, :, a:a + n].detach()
    padded = [p.requires_grad_() for p in padded]
    mask = torch.arange(width, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=mask[:, None, None, :])
    ref_weights = torch.zeros_like(ref, dtype=torch.float32)
    for i, (a, n) in enumerate(zip(bounds, lengths)):
        assert torch.allclose(out[0, a:a + n].transpose(0, 1).float(), ref[i, :, :n].float(), atol=2e-2, rtol=2e-2), i
        ref_weights[i, :, :n] = weights[0, a:a + n].transpose(0, 1)
    (ref.float() * ref_weights).sum().backward()
    for x, p in zip(leaves, padded):
        for i, (a, n) in enumerate(zip(bounds, lengths)):
            assert torch.allclose(x.grad[0, a:a + n].transpose(0, 1).float(), p.grad[i, :, :n].float(),
                                  atol=5e-2, rtol=5e-2), i


def test_step_graphs_train_as_the_eager_steps(tmp_path, tiny_bert):
    """train.cuda_graphs on CUDA: the replayed steps give the eager run's losses (a dropout-free model, so both draw
    nothing; bf16, so within its rounding), and only a shape's first steps ran eagerly."""
    from transformers import BertForSequenceClassification

    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert, model)  # its tokenizer and the data files the recipe reads from the model's folder
    BertForSequenceClassification.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
                                                  ).save_pretrained(model)
    runs = {}
    for graphs in ("false", "true"):
        cfg = recipe(tmp_path / f"{graphs}.yaml", model, tmp_path / graphs)
        r = run(launch_cmd(LAUNCH_DIR / "single_gpu.yaml", 1, "train", "--config", str(cfg), "train.max_steps=40",
                           "train.save_every=null", "train.log_every=1", f"train.cuda_graphs={graphs}"), timeout=300)
        rows = [json.loads(line) for line in (tmp_path / graphs / "metrics.jsonl").read_text().splitlines()]
        runs[graphs] = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
        if graphs == "true":
            assert re.search(r"CUDA graphs: [1-9]\d* captured", r.stdout), r.stdout[-3000:]
    assert sorted(runs["true"]) == sorted(runs["false"]) == list(range(1, 41))
    for step, loss in runs["false"].items():
        assert abs(runs["true"][step] - loss) < 2e-2, (step, loss, runs["true"][step])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_layers"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_every_replayed_step_draws_new_dropout_masks_on_cuda(dropout, compiled):
    """A captured step must not replay the dropout masks of its capture: at learning rate 0, replays of one batch
    differ only by their masks, so with dropout they differ and without it they agree (SDPA's attention dropout and
    the hidden dropout both, in bf16 weights as the GPU default trains). `compiled`: the layers compiled first
    (train.compile_scope=layers), so that the graph holds inductor's dropout, seeded on the device."""
    from transformers import BertConfig, BertForSequenceClassification

    from harness.graphs import StepGraphs, graph_backend
    from harness.modeling import compile_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation="sdpa")
    model = BertForSequenceClassification(config).cuda().to(torch.bfloat16).train()
    if compiled:
        compile_model(model, "default", "layers")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)

    def step(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, norm

    said = []
    runner = StepGraphs(step, optimizer, torch.device("cuda"), graph_backend(torch.device("cuda")),
                        reset=lambda: optimizer.zero_grad(set_to_none=True), say=said.append, warmup=2)
    mask = torch.ones(8, 64, dtype=torch.bool, device="cuda")
    mask[0, 40:] = False
    batch = {"input_ids": torch.randint(0, 100, (8, 64), device="cuda"), "attention_mask": mask[:, None, None, :],
             "labels": torch.randint(0, 2, (8,), device="cuda")}
    seen = [runner(batch)[0].clone() for _ in range(6)]
    assert not said and runner.replays == 4, said
    replayed = [x.item() for x in seen[2:]]
    if dropout:
        assert len(set(replayed)) == 4, replayed
    else:  # the same graph on the same inputs: the same loss; the eager step's, within bf16 rounding
        assert len(set(replayed)) == 1 and abs(replayed[0] - seen[0].item()) < 1e-2, (seen, replayed)

