import pytest

from harness.cli import main
from harness.recipes import load_config
from harness.schedule import warmup_steps_for
from harness.errors import BadInput
from tests.helpers import REPO


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.model.label_names is not None and len(cfg.model.label_names) == cfg.model.num_labels


def test_the_mrpc_recipe_is_a_sentence_pair_task_on_glue():
    cfg = load_config(REPO / "configs" / "bert_base_mrpc.yaml")
    d = cfg.data
    assert (d.dataset, d.dataset_config, d.text_column, d.text_pair_column) == ("nyu-mll/glue", "mrpc", "sentence1", "sentence2")
    assert (d.train_split, d.eval_split, cfg.model.label_names) == ("train", "validation", ["not_equivalent", "equivalent"])


def test_reference_recipe_has_the_agreed_hyperparameters():
    cfg = load_config(REPO / "configs" / "bert_base_imdb.yaml")
    assert (cfg.model.name_or_path, cfg.data.dataset, cfg.data.max_length) == ("bert-base-uncased", "stanfordnlp/imdb", 512)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.per_device_batch_size) == (3, 2e-5, 8)
    assert (cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.eval_every) == (500, 0.01, "epoch")


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      ["train.max_steps=20", "train.lr=3e-5", "data.train_samples=null", "train.eval_every=5",
                       "model.name_or_path=/some/where", "data.group_by_length=false"])
    assert cfg.train.max_steps == 20 and cfg.train.lr == 3e-5 and cfg.data.train_samples is None
    assert cfg.train.eval_every == 5 and cfg.model.name_or_path == "/some/where" and cfg.data.group_by_length is False


def test_defaults_without_a_file_and_int_to_float():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["optim.lr=1"], "unknown config section 'optim'"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["train.lr=-1"], "train.lr must be positive"),
        (["train.per_device_batch_size=0"], "train.per_device_batch_size must be at least 1"),
        (["train.epochs=1.5"], "train.epochs: expected an integer"),
        (["train.overwrite=maybe"], "expected true or false"),
        (["train.eval_every=sometimes"], "train.eval_every"),
        (["model.label_names=[a]"], "model.label_names has 1 names"),
        (["data.max_length=0"], "data.max_length"),
        (["data.truncation=middle"], "data.truncation must be head, head_tail or chunks"),
        (["train.compile=yes please"], "train.compile: expected true or false"),
        (["train.peak_flops=-1"], "train.peak_flops must be positive"),
        (["train.compile_scope=blocks"], "train.compile_scope must be model or layers"),
        (["train.cpu_dropout=quick"], "train.cpu_dropout must be fast or torch"),
        (["train.cuda_graphs=sometimes"], "train.cuda_graphs must be auto, true or false, got 'sometimes'"),
        (["model.unpadded=true", "train.compile=true", "train.compile_mode=reduce-overhead"],
         "a CUDA graph would be recorded for each"),
        (["train.warmup_steps=2.5"], "train.warmup_steps must be a whole number"),
        (["lr=1"], "must be section.key"),
        (["train.lr"], "must look like section.key=value"),
    ],
)
def test_bad_values_are_named(overrides, fragment):
    with pytest.raises(BadInput, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(REPO / "configs" / "quickstart.yaml", overrides)


def test_warmup_longer_than_the_run_is_refused():
    cfg = load_config(None, ["train.warmup_steps=500"])
    assert warmup_steps_for(cfg.train, 1000) == 500
    assert warmup_steps_for(load_config(None, ["train.warmup_steps=0.1"]).train, 1000) == 100
    with pytest.raises(BadInput, match="longer than the run"):
        warmup_steps_for(cfg.train, 100)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(BadInput, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(BadInput, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(BadInput, match="must be a mapping"):
        load_config(listy)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["train", "--config", "configs/quickstart.yaml", "train.bogus=1"], "unknown config key 'train.bogus'"),
        (["train"], "--config"),
        (["fly"], "invalid choice"),
        (["predict", "--model", "/nonexistent/model", "hello"], "not a model folder"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("harness: error:"), err
    assert fragment in err
