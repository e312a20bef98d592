"""`train.cuda_graphs`: whole training steps captured once per batch shape and replayed (harness.graphs).

CI has no GPU, so the graphs here are tests/graph_tape.py's CPU stand-in, which replays the recorded operators
on the recorded tensors as a CUDA graph replays its kernels: a value the step reads from Python at capture (a
float learning rate), an input not copied into the graph, or optimizer state created inside the capture gives
other weights than the eager run, and a host synchronisation fails the capture. The real graphs run in the
GPU suite (tests/gpu).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import shutil

import pytest
import torch
from torch.nn import functional as F

from harness import graphs, stepper, trainer
from harness.recipes import load_config
from harness.errors import BadInput
from harness.graphs import StepGraphs
from tests.graph_tape import TapeGraph, _Recorder
from tests.helpers import harness, losses, ok, write_config


def tiny_setup(seed: int = 0, reads_the_loss: bool = False):
    """A 2-layer BERT with dropout, fused AdamW and a decaying learning rate, as the loop builds them;
    `reads_the_loss`: the step reads the loss on the host between the backward and the optimizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))

    def step(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        if reads_the_loss and loss.item() > 100:  # a host synchronisation, which no capture allows
            raise AssertionError
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, norm

    return model, optimizer, scheduler, step


def batches():
    """Two shapes interleaved, and a third seen once (as an epoch's last, shorter batch)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 16), (4, 24)] * 5 + [(3, 16)]
    out = []
    for n, length in shapes:
        mask = torch.ones(n, length, dtype=torch.bool)
        mask[0, length // 2:] = False
        mask = mask[:, None, None, :]  # harness's 4D mask: the 2D one has transformers read it on the host
        out.append({"input_ids": torch.randint(0, 64, (n, length), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, 2, (n,), generator=g)})
    return out


def train_steps(warmup: int, break_lr: bool = False, reads_the_loss: bool = False, said: list | None = None):
    model, optimizer, scheduler, step = tiny_setup(reads_the_loss=reads_the_loss)

    def reset():
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)

    said = [] if said is None else said
    runner = StepGraphs(step, optimizer, torch.device("cpu"), TapeGraph, reset, say=said.append, warmup=warmup)
    if break_lr:  # what a graph replays if the learning rate stays a Python float
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"])
    torch.manual_seed(5)
    seen = []
    for batch in batches():
        loss, norm = runner(batch)
        seen.append((loss.clone(), norm.clone()))
        scheduler.step()
    return runner, seen, [p.detach().clone() for p in model.parameters()]


def test_replayed_steps_train_exactly_as_eager_ones():
    eager, eager_seen, eager_weights = train_steps(warmup=10**6)  # never captures: the same loop, all eager
    graphs, seen, weights = train_steps(warmup=1)
    assert (len(eager.graphs), eager.replays) == (0, 0)
    assert len(graphs.graphs) == 2 and graphs.replays == 8 and graphs.eager_steps == 3, graphs.report()
    for i, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(seen, eager_seen)):
        assert torch.equal(loss, ref_loss) and torch.equal(norm, ref_norm), f"step {i}: {loss} vs {ref_loss}"
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights)), "the same weights after 11 steps"


def test_captures_run_inside_quiet_and_nothing_else_does():
    """train.sync_debug counts synchronisations in steps; a capture makes some by design (torch.cuda.graph synchronises
    on entry), so the loop's counter is paused for captures only: replays and eager steps stay counted."""
    model, optimizer, _, step = tiny_setup()
    inside, quiet_depth = [], [0]

    def watched(batch):
        inside.append(quiet_depth[0])
        return step(batch)

    @contextlib.contextmanager
    def quiet():
        quiet_depth[0] += 1
        yield
        quiet_depth[0] -= 1

    runner = StepGraphs(watched, optimizer, torch.device("cpu"), TapeGraph, reset=lambda: None, warmup=1, quiet=quiet)
    for batch in batches():
        runner(batch)
    # Python runs the step only eagerly (3 times: each shape's first batch) and at the 2 captures; replays run none
    assert inside == [0, 0, 1, 1, 0], inside


def test_the_stand_in_sees_what_a_cuda_graph_would_get_wrong():
    """The check above can fail: a learning rate left a float is replayed as it was at capture, and optimizer state
    created inside the capture (no eager step before it) is created again, at zero, by every replay."""
    _, _, eager_weights = train_steps(warmup=10**6)
    for broken in (dict(warmup=1, break_lr=True), dict(warmup=0)):
        _, _, weights = train_steps(**broken)
        assert not all(torch.equal(a, b) for a, b in zip(weights, eager_weights)), broken


def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_why():
    """A host synchronisation fails the capture (as on CUDA): that shape stays eager, the run goes on with the
    eager run's results (the failed capture ran nothing, and the gradients it left are cleared), and the reason
    is printed once per shape."""
    _, eager_seen, eager_weights = train_steps(warmup=10**6, reads_the_loss=True)
    said = []
    runner, seen, weights = train_steps(warmup=1, reads_the_loss=True, said=said)
    assert len(runner.graphs) == 0 and runner.replays == 0 and len(runner.failed) == 2 and runner.eager_steps == 11
    assert len(said) == 2 and all("could not be captured (aten._local_scalar_dense: a host synchronisation" in m for m in said), said
    assert "2 shape(s) failed to capture" in runner.report()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen, eager_seen))
    assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))


@pytest.mark.parametrize("dropout", [0.2, 0.0])
def test_every_replay_draws_new_dropout_masks(dropout):
    """Replays of one batch at learning rate 0 differ only by their dropout masks: they must differ (the generator
    moves on at each replay, as CUDA's does for a captured graph) with dropout, and agree without it."""
    model, optimizer, _, step = tiny_setup()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    runner = StepGraphs(step, optimizer, torch.device("cpu"), TapeGraph, reset=lambda: None, warmup=1)
    for group in optimizer.param_groups:
        group["lr"].fill_(0.0)
    batch = batches()[0]
    losses_seen = [runner(batch)[0].clone() for _ in range(4)]  # one eager step, then a capture and replays
    assert runner.replays == 3
    replayed = losses_seen[1:]
    if dropout:
        assert len({x.item() for x in replayed}) == 3, replayed
    else:
        assert all(torch.equal(x, losses_seen[0]) for x in replayed), losses_seen


def graph_run(tmp_path, tiny_model, name: str, monkeypatch, cuda_graphs, capture: bool = True, data=None, **train):
    """`harness train` in this process, its graphs the CPU stand-in (CI has no CUDA); `capture=False`: the loop of
    train.cuda_graphs (the learning rate a tensor) with every step eager."""
    monkeypatch.setattr(graphs, "graph_backend", lambda device: TapeGraph)
    monkeypatch.setattr(stepper, "StepGraphs", StepGraphs if capture else functools.partial(StepGraphs, warmup=10**9))
    cfg = write_config(tmp_path / f"{name}.yaml", tiny_model, tmp_path / name,
                       data={"train_samples": 48, "max_length": 24, **(data or {})},
                       train={"epochs": 2, "eval_every": 6, "cuda_graphs": cuda_graphs, **train})
    trainer.train(load_config(cfg, []))
    return cfg, tmp_path / name


@pytest.mark.parametrize("precision", ["fp32", "bf16_master_weights"])
def test_a_run_with_cuda_graphs_trains_as_the_eager_run(tmp_path, tiny_model, monkeypatch, capfd, precision):
    """The real loop: 24 steps over batches of three padded lengths, evaluations between replays. In fp32 (no launch
    config) and in the GPU default, bf16 weights with fp32 masters, whose optimizer hooks are captured with the step:
    - the same losses and weights, bit for bit, as the same loop with every step eager;
    - the plain eager run's within the rounding of the learning rate, a float32 tensor with graphs (in bf16 a
      last-bit change of a master weight can change the bf16 weight's rounding: 1e-4)."""
    extra = {}
    if precision == "bf16_master_weights":  # what a bf16 launch config sets; master weights are the GPU default
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        extra = {"bf16_mode": "master_weights"}
    _, eager = graph_run(tmp_path, tiny_model, "eager", monkeypatch, cuda_graphs=False, **extra)
    _, uncaptured = graph_run(tmp_path, tiny_model, "uncaptured", monkeypatch, cuda_graphs=True, capture=False, **extra)
    capfd.readouterr()
    _, graphed = graph_run(tmp_path, tiny_model, "graphs", monkeypatch, cuda_graphs=True, **extra)
    out = capfd.readouterr().out
    if extra:
        assert "mixed precision bf16 weights, fp32 master weights" in out
    report = re.search(r"CUDA graphs: (\d+) captured .* (\d+) step\(s\) replayed, (\d+) run eagerly", out)
    assert report, out[-2000:]
    captured, replayed, eager_steps = map(int, report.groups())
    assert captured >= 2 and replayed >= 12 and replayed + eager_steps == 24, report.group(0)
    from safetensors.torch import load_file

    after = losses(graphed)
    assert losses(uncaptured) == after and sorted(after) == list(range(1, 25))
    weights, same_loop = (load_file(run / "final" / "model.safetensors") for run in (graphed, uncaptured))
    assert all(torch.equal(weights[k], same_loop[k]) for k in weights)
    tol = 1e-6 if precision == "fp32" else 1e-4
    before, plain = losses(eager), load_file(eager / "final" / "model.safetensors")
    for step in before:
        assert after[step] == pytest.approx(before[step], abs=tol), f"step {step}: {before[step]} vs {after[step]}"
    assert all((weights[k] - plain[k]).abs().max() < 10 * tol for k in weights)


@pytest.mark.parametrize("graphs_after", [True, False], ids=["with_graphs", "eagerly"])
def test_a_run_with_cuda_graphs_resumes_exactly(tmp_path, tiny_model, monkeypatch, graphs_after):
    """A checkpoint written between replays (the optimizer's learning rate is then a tensor) resumes to the losses
    of the uninterrupted run, with graphs captured anew or eagerly (train.cuda_graphs may change on resume)."""
    _, out = graph_run(tmp_path, tiny_model, "run", monkeypatch, cuda_graphs=True, save_every=8, keep_last=3)
    straight = losses(out)
    shutil.rmtree(out / "final")  # as if the job had been preempted after the checkpoint at step 8
    graph_run(tmp_path, tiny_model, "run", monkeypatch, cuda_graphs=graphs_after, save_every=8, keep_last=3,
              resume=str(out / "checkpoints" / "step-00000008"))
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(9, 25):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}: {straight[step]} vs {resumed[step]}"


def test_compiled_layers_are_captured_compiled_and_train_as_uncaptured(tmp_path, tiny_model, monkeypatch, capfd):
    """train.compile (layers) with train.cuda_graphs: the layers are compiled in the uncaptured steps, and every
    capture records the compiled code. The same losses and weights, bit for bit, as the same compiled loop without
    captures, and no compilation during a capture (the same number of compiled graphs in both runs)."""
    from torch._dynamo.utils import counters
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    calls = collections.Counter()  # calls of the compiled layer graph: inside a capture or not

    def aot_eager_counted(gm, example_inputs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            calls["in a capture" if any(isinstance(m, _Recorder) for m in _get_current_dispatch_mode_stack())
                  else "uncaptured"] += 1
            return compiled(*args)
        return run

    # the stand-in records the operators that reach torch's dispatcher; inductor's CPU kernels are C++ that it calls
    # directly, so here the layers compile with aot_eager (dynamo's graphs and AOT autograd, eager kernels), counted;
    # the GPU suite captures inductor's own kernels
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: real_compile(*a, **{**k, "backend": aot_eager_counted}))
    compiled, runs = {}, {}
    for name, capture in (("uncaptured", False), ("graphs", True)):
        torch._dynamo.reset()
        counters.clear()
        calls.clear()
        capfd.readouterr()
        _, runs[name] = graph_run(tmp_path, tiny_model, name, monkeypatch, cuda_graphs=True, capture=capture,
                                  data={"pad_multiple": 8},  # three padded lengths (auto pads to 64 when compiling)
                                  compile=True, compile_scope="layers")
        out = capfd.readouterr().out
        assert "torch.compile (default): each of its 2 BertLayers" in out, out[-2000:]
        compiled[name] = re.search(r"torch.compile: (\d+) graph\(s\) compiled", out).group(1)
    report = re.search(r"CUDA graphs: (\d+) captured .* (\d+) step\(s\) replayed", out)
    assert int(report.group(1)) >= 2 and int(report.group(2)) >= 12, report.group(0)
    # each capture ran both layers' compiled code, and none was compiled inside a capture (a capture cannot compile:
    # inductor benchmarks its kernels by running them) or in the replays (there is no Python in them)
    assert calls["in a capture"] == 2 * int(report.group(1)), calls
    assert compiled["graphs"] == compiled["uncaptured"], compiled
    assert losses(runs["graphs"]) == losses(runs["uncaptured"]) and sorted(losses(runs["graphs"])) == list(range(1, 25))
    from safetensors.torch import load_file

    weights, same_loop = (load_file(run / "final" / "model.safetensors") for run in (runs["graphs"], runs["uncaptured"]))
    assert all(torch.equal(weights[k], same_loop[k]) for k in weights)


def test_auto_captures_one_process_runs_and_steps_eagerly_where_graphs_cannot_apply(tmp_path, tiny_model, monkeypatch,
                                                                                    capfd):
    """train.cuda_graphs=auto (the default) where a CUDA graph backend exists (here the stand-in): the run is
    captured as with `true`, the same losses; with a setting that `true` refuses, or the 2D mask, the steps run
    eagerly with the reason printed, where `true` exits 2."""
    _, explicit = graph_run(tmp_path, tiny_model, "true", monkeypatch, cuda_graphs=True)
    capfd.readouterr()
    _, auto = graph_run(tmp_path, tiny_model, "auto", monkeypatch, cuda_graphs="auto")
    out = capfd.readouterr().out
    assert re.search(r"CUDA graphs: [1-9]\d* captured", out), out[-2000:]
    assert losses(auto) == losses(explicit)
    for name, settings, reason in (
            ("accum", {"grad_accum_steps": 2}, "train.grad_accum_steps above 1"),
            ("mask2d", {}, "sdpa attention with model.attention_mask=2d: graphs need SDPA with a 4D mask")):
        model = {"attention_mask": "2d"} if name == "mask2d" else {}
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model, tmp_path / name, model=model,
                           data={"train_samples": 48, "max_length": 24}, train={"max_steps": 4, **settings})
        capfd.readouterr()
        trainer.train(load_config(cfg, []))
        out = capfd.readouterr().out
        assert f"train.cuda_graphs=auto: the steps run eagerly ({reason}" in out, out[-2000:]
        assert "CUDA graphs:" not in out and (tmp_path / name / "final" / "model.safetensors").is_file()
        with pytest.raises(BadInput, match="train.cuda_graphs (does not go with|needs SDPA)"):
            trainer.train(load_config(cfg, ["train.cuda_graphs=true", f"train.output_dir={tmp_path / (name + '-true')}"]))


def test_auto_steps_eagerly_on_several_processes_where_true_is_refused(monkeypatch):
    """The launch's part of the decision, for a GPU and two DDP ranks (given as numbers: CI has one CPU
    and no CUDA; the real two-rank refusal of `true` is test_several_processes_are_refused_in_one_line)."""
    monkeypatch.setattr(graphs, "graph_backend", lambda device: TapeGraph)
    said = []
    for value in ("auto", True, False):
        cfg = load_config(None, [f"train.cuda_graphs={str(value).lower()}"])
        if value is True:
            with pytest.raises(BadInput, match="train.cuda_graphs runs one process without DeepSpeed or FSDP"):
                graphs.backend_for(cfg, torch.device("cuda"), 2, None, "sdpa", "auto", said.append)
        else:
            assert graphs.backend_for(cfg, torch.device("cuda"), 2, None, "sdpa", "auto", said.append) is None
    assert said == ["train.cuda_graphs=auto: the steps run eagerly (2 processes: graphs of whole steps are for one "
                    "process without DeepSpeed or FSDP)"]


def test_on_a_cpu_the_cli_says_so_and_trains_eagerly(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", train={"max_steps": 3, "cuda_graphs": True})
    r = ok(harness("train", "--config", str(cfg)))
    assert "train.cuda_graphs: no CUDA device (cpu), the steps run eagerly" in r.stdout
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_several_processes_are_refused_in_one_line(tmp_path, tiny_model):
    """A graph replays one process's kernels; DDP's all-reduce between ranks is not in it: exit 2 on every rank."""
    cfg = write_config(tmp_path / "c.yaml", tiny_model, tmp_path / "run", train={"max_steps": 3, "cuda_graphs": True})
    r = harness("train", "--config", str(cfg), procs=2)
    assert "2 process(es) x batch 4" in r.stdout, "the launch really started two ranks"
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    assert "harness: error: train.cuda_graphs runs one process without DeepSpeed or FSDP" in r.stderr
    assert "Traceback" not in r.stderr.split("exitcode")[0], r.stderr[-3000:]


@pytest.mark.parametrize("overrides, fragment", [
    (["train.grad_accum_steps=2"], "train.cuda_graphs does not go with train.grad_accum_steps"),
    (["train.compile=true", "train.compile_mode=reduce-overhead"],
     "train.cuda_graphs does not go with train.compile_mode=reduce-overhead, which records CUDA graphs of its own"),
    (["train.compile=true", "train.compile_mode=max-autotune"], "train.cuda_graphs does not go with train.compile_mode=max-autotune"),
    (["model.unpadded=true"], "train.cuda_graphs does not go with model.unpadded"),
])
def test_true_with_a_config_that_rules_graphs_out_is_refused_by_plan(tmp_path, overrides, fragment, capsys):
    """`harness plan` (and `harness train`, before it tokenizes anything) refuse it in one line, exit 2."""
    from harness.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{dataset: synthetic, train_samples: 64, eval_samples: 16}}\ntrain: {{output_dir: {tmp_path / 'run'}}}\n")
    assert main(["plan", "--config", str(recipe), "train.cuda_graphs=true", *overrides]) == 2
    assert f"harness: error: {fragment}" in capsys.readouterr().err
    for auto in (["train.cuda_graphs=auto"], ["train.cuda_graphs=false"]):  # the same config runs eagerly
        graphs.check_config(load_config(recipe, auto + overrides))
