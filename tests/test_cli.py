"""The command line on its own: bad input is one line and exit 2; plan --status and --get for scripts."""

from harness.cli import main


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no training_config.yaml" in err
    assert main(["predict", "--model", str(tmp_path / "missing"), "text"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert capsys.readouterr().err == "harness: error: train: the following arguments are required: --config\n"
    assert main(["predict", "--model", str(tmp_path), "--bogus"]) == 2  # the program's name once, not twice
    assert capsys.readouterr().err == "harness: error: unrecognized arguments: --bogus\n"
    assert main(["plan", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"harness: error: config file not found: {tmp_path / 'nope.yaml'}"


def test_plan_status_and_get_for_scripts(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{dataset: synthetic}}\ntrain: {{output_dir: {tmp_path / 'out'}}}\n")
    assert main(["plan", "--config", str(recipe), "--status"]) == 0
    assert capsys.readouterr().out == "fresh\n"
    (tmp_path / "out" / "final").mkdir(parents=True)
    (tmp_path / "out" / "final" / "config.json").write_text("{}")
    assert main(["plan", "--config", str(recipe), "--status"]) == 0
    assert capsys.readouterr().out == "finished\n"
    assert main(["plan", "--config", str(recipe), "--get", "train.output_dir"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
