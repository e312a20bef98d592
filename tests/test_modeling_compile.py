"""`train.compile`: the compiled path (inductor, on the CPU here) trains like the eager model and exports a
model that `from_pretrained` loads (torch.compile's wrapper names every parameter "_orig_mod.…")."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from tests.helpers import dropout_free, harness, losses, ok, write_config


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory, tiny_model):
    return dropout_free(tiny_model, tmp_path_factory.mktemp("one-layer"), 1)  # half the graph to compile


def test_a_compiled_run_trains_like_the_eager_one_and_exports_a_model_that_loads(tmp_path, one_layer):
    from transformers import AutoModelForSequenceClassification

    model_dir = one_layer
    recipe = dict(data={"train_samples": 32}, train={"max_steps": 8, "lr": 3e-3})
    eager_cfg = write_config(tmp_path / "eager.yaml", model_dir, tmp_path / "eager", **recipe)
    compiled_cfg = write_config(tmp_path / "compiled.yaml", model_dir, tmp_path / "compiled", **recipe)
    # both runs pad to multiples of 8, so that the 8 steps see several padded lengths (and compute on the same tensors)
    runs = [ok(harness("train", "--config", str(eager_cfg), "data.pad_multiple=8")),
            ok(harness("train", "--config", str(compiled_cfg), "data.pad_multiple=8", "train.compile=true", timeout=600))]
    eager_first, compiled_first = (float(re.search(r"first step in ([0-9.]+) s", r.stdout).group(1)) for r in runs)
    assert compiled_first > max(1.0, 5 * eager_first), "the first step compiled the model"
    rows = [r for r in map(json.loads, (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    # each step's padded length: its real tokens per example over the share of tokens that are real
    widths = {round(r["train/tokens_per_s"] / r["train/samples_per_s"] / (1 - r["train/padding_fraction"])) for r in rows}
    assert len(widths) >= 2 and widths <= {8, 16, 24, 32}, widths
    # one graph for every batch shape: not one specialised to the first batch, then a second when the length changes,
    # nor a third when the first step's write of config.problem_type or the removal of a hook fails a guard
    assert "torch.compile: 1 graph(s) compiled, 0 graph break(s)" in runs[1].stdout

    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert list(compiled) == list(range(1, 9))
    assert compiled == pytest.approx(eager, abs=1e-4), "inductor's kernels compute what the eager model computes"

    with safe_open(str(tmp_path / "compiled" / "final" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    with safe_open(str(tmp_path / "eager" / "final" / "model.safetensors"), "pt") as f:
        assert names == set(f.keys()), "the export carries the model's own parameter names"
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "eager" / "final")
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "compiled" / "final")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-4), name  # the trained weights, not a fresh initialisation
    results = [json.loads((tmp_path / run / "final" / "eval_results.json").read_text()) for run in ("eager", "compiled")]
    assert results[1]["num_examples"] == 41
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], abs=1e-4)


def test_compiling_the_layers_compiles_one_graph_for_all_of_them_and_trains_like_the_eager_model(tmp_path, tiny_model):
    """train.compile_scope=layers: each encoder layer compiled in place; the layers share one graph (their parameters
    are its inputs), the embeddings and the head run eagerly. Batches with and without padding must not compile a
    second graph (without padding transformers would hand the layers no mask at all), nor batches whose padded length
    is the batch size and others (torch's duck sizing would give both one symbol, and compile
    again at the first batch padded to another length than the batch size)."""
    model_dir = dropout_free(tiny_model, tmp_path / "two-layers", 2)
    # max_length 16 truncates most synthetic reviews: the epoch's first batches have no padding (16 x 16 tokens), the
    # next are padded to 16, its last ones (the shortest reviews) to 8
    recipe = dict(data={"train_samples": 256, "max_length": 16},
                  train={"max_steps": 16, "lr": 3e-3, "per_device_batch_size": 16})
    eager_cfg = write_config(tmp_path / "eager.yaml", model_dir, tmp_path / "eager", **recipe)
    layers_cfg = write_config(tmp_path / "layers.yaml", model_dir, tmp_path / "layers", **recipe)
    ok(harness("train", "--config", str(eager_cfg), "data.pad_multiple=8"))
    run = ok(harness("train", "--config", str(layers_cfg), "data.pad_multiple=8", "train.compile=true",
                     "train.compile_scope=layers", timeout=600))
    assert "torch.compile (default): each of its 2 BertLayers" in run.stdout
    assert "torch.compile: 1 graph(s) compiled, 0 graph break(s)" in run.stdout
    rows = [r for r in map(json.loads, (tmp_path / "layers" / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    padding = [r["train/padding_fraction"] for r in rows]
    assert min(padding) == 0 < max(padding), padding
    # one batch a step: its padded length is its real tokens per example over its share of real tokens
    lengths = [round(r["train/tokens_per_s"] / r["train/samples_per_s"] / (1 - r["train/padding_fraction"])) for r in rows]
    assert lengths[0] == 16 and 8 in lengths, lengths  # the first graph saw 16 x 16, then came 16 x 8

    eager, layers = losses(tmp_path / "eager"), losses(tmp_path / "layers")
    assert list(layers) == list(range(1, 17))
    assert layers == pytest.approx(eager, abs=1e-4)
    with safe_open(str(tmp_path / "layers" / "final" / "model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "eager" / "final" / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys()), "the export carries the model's own parameter names"
        for name in g.keys():
            assert torch.allclose(f.get_tensor(name), g.get_tensor(name), atol=1e-4), name


def test_the_compile_report_counts_graphs_whose_cuda_graph_was_skipped():
    """`reduce-overhead` records CUDA graphs; where inductor skips one (always on a CPU) the graph still runs,
    only slower, so the report says how many were skipped: on a GPU the figure to read before any timing."""
    from harness.tracking import compile_report

    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    f = torch.compile(lambda x: (x * 2).sin().sum(), mode="reduce-overhead")
    f(torch.randn(8, requires_grad=True)).backward()
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - before
    assert skipped >= 1, "on a CPU there is no CUDA graph to record"
    total = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert compile_report(cuda_graphs=True).endswith(f", CUDA graphs skipped for {total} compiled graph(s)")
    assert "CUDA graphs" not in compile_report()
