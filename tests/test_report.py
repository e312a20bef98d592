"""`harness report` over real run folders: a finished 2-rank run with `harness evaluate`'s error analysis
beside its model, and an unfinished 1-process run of another learning rate."""

import json
import re
import shutil
import sys

import pytest

from harness.cli import main
from tests.helpers import harness, ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, ddp_ten_steps):
    ddp_cfg, ddp = ddp_ten_steps
    tmp_path = tmp_path_factory.mktemp("report")
    finished = tmp_path / "ddp-lr3e-3"
    shutil.copytree(ddp, finished)
    ok(harness("evaluate", "--model", str(finished / "final")))
    unfinished = tmp_path / "lr1e-3"
    # the DDP run's recipe (its model included) with another learning rate and evaluation interval
    ok(harness("train", "--config", str(ddp_cfg), f"train.output_dir={unfinished}", "train.lr=1e-3",
               "train.eval_every=5"))
    shutil.rmtree(unfinished / "final")  # as if preempted after its last evaluation
    return finished, unfinished


def test_report_compares_runs_on_one_self_contained_page(tmp_path, two_runs):
    finished, unfinished = two_runs
    r = ok(harness("report", str(finished), str(unfinished), "--out", str(tmp_path / "compare.html")))
    page = (tmp_path / "compare.html").read_text()

    # Markdown on stdout: one row per run, the differing config keys as columns, the best value in bold
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["run", "train.eval_every", "train.lr"] and "accuracy" in header and "samples/s" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    assert set(rows) == {"ddp-lr3e-3", "lr1e-3"}
    assert rows["ddp-lr3e-3"][header.index("status")] == "finished"
    assert rows["lr1e-3"][header.index("status")] == "unfinished" and rows["lr1e-3"][header.index("steps")] == "10"
    assert rows["ddp-lr3e-3"][header.index("hardware")].startswith("2 x cpu") and "DDP" in rows["ddp-lr3e-3"][header.index("hardware")]
    accuracies = {name: row[header.index("accuracy")] for name, row in rows.items()}
    final = json.loads((finished / "final" / "eval_results.json").read_text())["accuracy"]
    last_eval = [json.loads(line) for line in (unfinished / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in line][-1]
    values = {"ddp-lr3e-3": final, "lr1e-3": last_eval["eval/accuracy"]}
    best = max(values.values())
    for name, shown in accuracies.items():
        assert shown == (f"**{values[name]:.4f}**" if values[name] == best else f"{values[name]:.4f}")
    assert "confusion matrix (final/" in r.stdout

    # the page: self-contained (embedded PNGs, nothing fetched), every curve, the error analysis
    assert not re.search(r'(src|href)="(https?:)?//', page)
    images = page.count('src="data:image/png;base64,')
    assert images >= 4 + 1 + 1, images  # loss, lr, grad norm, throughput; eval metrics; the confusion matrix
    for title in ("training loss", "learning rate", "gradient norm", "throughput", "Most confident mistakes"):
        assert title in page, title
    mistakes = [json.loads(line) for line in (finished / "final" / "predictions.jsonl").read_text().splitlines()
                if json.loads(line)["label"] != json.loads(line)["predicted"]]
    assert mistakes, "a tiny model after 10 steps errs: the page must show its most confident mistake"
    worst = max(mistakes, key=lambda p: p["probabilities"][p["predicted"]])
    assert f"<td>{worst['id']}</td>" in page
    assert "lr: 0.003" in page and "lr: 0.001" in page  # each run's resolved config


def test_report_without_matplotlib_or_on_a_non_run_folder_is_one_line_and_exit_2(tmp_path, two_runs, monkeypatch, capsys):
    finished, _ = two_runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["report", str(finished), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err == "harness: error: report: the HTML page needs matplotlib: pip install -e '.[report]'\n"
    assert not (tmp_path / "r.html").exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a harness run folder" in capsys.readouterr().err


def test_wall_time_counts_the_launches_that_ended_and_the_keys_that_differ(tmp_path):
    """In-process, on hand-written folders: a preempted launch (ended) and a killed one (no end record)."""
    import yaml

    from harness.report import Run, differing_keys

    for name, lr in (("a", 1e-5), ("b", 2e-5)):
        root = tmp_path / name
        root.mkdir()
        (root / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "seed": 1, "output_dir": str(root)}}))
        (root / "metrics.jsonl").write_text('{"step": 5, "train/loss": 0.5, "train/samples_per_s": 10.0}\n'
                                            '{"step": 10, "train/loss": 0.4, "train/samples_per_s": 30.0}\n{"step": 1')
    sessions = [{"time": 100.0, "event": "started", "processes": 2, "device": "cpu (x86_64)", "parallelism": "DDP",
                 "mixed_precision": "no"}, {"time": 160.0, "event": "ended"},
                {"time": 200.0, "event": "started"}, {"time": 230.0, "event": "ended"},
                {"time": 300.0, "event": "started"}]  # killed: no end
    # the launch log under its old name (harness 0.1) and its new one: both are read
    (tmp_path / "a" / "sessions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sessions[:2]))
    (tmp_path / "a" / "launches.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sessions[2:]))
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    assert a.wall_time_s() == 90.0 and b.wall_time_s() is None
    assert a.samples_per_s() == 20.0 and a.last_step() == 10, "a line cut short by a kill is skipped"
    assert a.status() == "unfinished" and a.hardware() == "2 x cpu (x86_64), DDP, no" and b.hardware() == "unknown"
    assert differing_keys([a, b]) == ["train.lr"], "output_dir always differs and is left out"


def test_malformed_run_files_are_skipped_and_a_missing_out_folder_is_one_line(tmp_path, capsys):
    """A run folder's files are read defensively: records that are not objects, steps that are not numbers, a config
    that is not a mapping, a confusion matrix of the wrong shape; --out into a missing folder is refused first."""
    run = tmp_path / "odd"
    run.mkdir()
    (run / "config.yaml").write_text("[1, 2, 3]\n")
    (run / "metrics.jsonl").write_bytes(b'[1, 2]\n{"step": "x", "train/loss": 1}\n{"step": 3, "train/loss": 0.5}\n\xff\n')
    (run / "launches.jsonl").write_text('{"time": "noon", "event": "started"}\n"text"\n')
    (run / "final").mkdir()
    (run / "final" / "eval_results.json").write_text('["not", "a", "mapping"]')
    assert main(["report", str(run), "--out", str(tmp_path / "nowhere" / "r.html")]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "| odd | unfinished | 3 |" in out and (tmp_path / "r.html").is_file()
    assert not list(tmp_path.glob("*.tmp"))
