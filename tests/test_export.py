"""What an exported model folder holds: the model, its tokenizer, how it was trained, and a model card the Hub reads."""

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from harness.config import TASK_METRICS

pytestmark = pytest.mark.slow


def test_final_holds_a_model_card_with_the_hub_metadata_of_its_run(ddp_ten_steps):
    """The 2-rank DDP reference run's final/: the card's metadata names the task and the metrics of the evaluation
    in eval_results.json; its text states the base model, the hyperparameters and the launch."""
    cfg_path, run = ddp_ten_steps
    final = run / "final"
    card = ModelCard.load(final / "README.md")
    meta = card.data.to_dict()
    results = json.loads((final / "eval_results.json").read_text())
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "transformers"
    assert "base_model" not in meta and "datasets" not in meta, "a local model and synthetic data are not hub ids"
    [entry] = meta["model-index"][0]["results"]
    assert entry["task"]["type"] == "text-classification" and entry["dataset"]["name"] == "synthetic"
    assert {m["type"]: m["value"] for m in entry["metrics"]} == {k: results[k] for k in TASK_METRICS["single_label"]}
    recipe = yaml.safe_load(cfg_path.read_text())
    assert f"- learning rate: {recipe['train']['lr']}" in card.text and "- max steps: 10" in card.text
    assert "Launched on 2 process(es), DDP, precision no." in card.text


def test_a_hub_model_and_dataset_are_named_in_the_metadata(tmp_path):
    from pathlib import Path

    from harness.export import model_card
    from harness.recipes import load_config

    cfg = load_config(None, ["model.label_names=[neg, pos]"])  # bert-base-uncased on stanfordnlp/imdb
    results = {"accuracy": 0.91, "f1": 0.9, "precision": 0.9, "recall": 0.9, "loss": 0.3, "num_examples": 25000}
    text = model_card(cfg, {"processes": 8, "parallelism": "DDP", "precision": "bf16"}, results, Path("out/run/final"))
    (tmp_path / "README.md").write_text(text)
    meta = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert meta["base_model"] == "bert-base-uncased" and meta["datasets"] == ["stanfordnlp/imdb"]
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"
    assert "| accuracy | 0.9100 |" in text and "Labels: neg, pos." in text


def test_an_export_draws_no_progress_bar_and_leaves_the_setting_as_it_was(tmp_path, tiny_model, capfd):
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from harness.export import save_model

    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0,
                                  wait_for_everyone=lambda: None, unwrap_model=lambda m, **k: m,
                                  get_state_dict=lambda m: m.state_dict())
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    transformers_logging.enable_progress_bar()
    save_model(accelerator, model, AutoTokenizer.from_pretrained(tiny_model), tmp_path / "final")
    assert "Writing model shards" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled() and (tmp_path / "final" / "model.safetensors").is_file()
