"""`harness report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page and a Markdown summary on stdout.

    harness report outputs/bert_base_imdb                          # writes outputs/bert_base_imdb/report.html
    harness report outputs/sweep/* --out sweep.html                 # curves overlaid, one table row per run

It reads only the run folders (metrics.jsonl, config.yaml, launches.jsonl, final/, best/, and the
predictions.jsonl / confusion_matrix.json that `harness evaluate` writes beside a model), so it works on an
unfinished or preempted run and on a copy of the folder on a laptop. Plots are PNGs embedded in the page
(matplotlib, the `report` extra): nothing is fetched when the page is viewed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import yaml

from harness.checkpoint import verify
from harness.config import METRICS
from harness.errors import BadInput, WriteFailed
from harness.export import EVALUATION
from harness.recipes import read_yaml_file

TRAIN_CURVES = [("train/loss", "training loss"), ("train/lr", "learning rate"), ("train/grad_norm", "gradient norm"),
                ("train/samples_per_s", "throughput (samples/s)")]


class Run:
    """What one run folder holds, read defensively: any file may be missing (a run still going, or cut short)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BadInput(f"report: {self.root} is not a folder")
        if not (self.root / "metrics.jsonl").is_file() and not (self.root / "config.yaml").is_file():
            raise BadInput(f"report: {self.root} is not a harness run folder (no metrics.jsonl or config.yaml)")
        self.name = self.root.name
        self.records = [r for r in self._jsonl(self.root / "metrics.jsonl") if _number(r.get("step"))]
        self.config = self._yaml(self.root / "config.yaml")
        # the launch log, under the name harness 0.1 gave it too
        self.launches = [r for r in self._jsonl(self.root / "sessions.jsonl") + self._jsonl(self.root / "launches.jsonl")
                         if _number(r.get("time"))]
        self.final = self._json(self.root / "final" / "eval_results.json")
        self.best = self._json(self.root / "best" / "eval_results.json")
        # where `harness evaluate` wrote a whole evaluation (its manifest lists the files as they are)
        evaluated = [d for d in (self.root / "final", self.root / "best") if (d / "predictions.jsonl").is_file()]
        self.model_dir = next((d for d in evaluated if verify(d, EVALUATION) is None), None)
        self.cut_short = [d for d in evaluated if d != self.model_dir and verify(d, EVALUATION) is not None]

    @staticmethod
    def _jsonl(path: Path) -> list[dict]:
        """The records of a JSON-lines file: a line cut short by a kill, or anything but an object, is skipped."""
        try:
            lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    @staticmethod
    def _json(path: Path) -> dict | None:
        try:
            loaded = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    @staticmethod
    def _yaml(path: Path) -> dict:
        try:
            loaded = read_yaml_file(path, str(path))
            return loaded if isinstance(loaded, dict) else {}
        except (BadInput, yaml.YAMLError):
            return {}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    def eval_keys(self) -> list[str]:
        return sorted({k for r in self.records for k in r if k.startswith("eval/") and k != "eval/num_examples"})

    def last_step(self) -> int | None:
        return max((r["step"] for r in self.records), default=None)

    def status(self) -> str:
        if self.final is not None:
            return "finished" + (" (early stopping)" if "early_stopping" in self.final else "")
        return "unfinished"

    def wall_time_s(self) -> float | None:
        """Sum over launches of (end - start); a launch killed without an end record (kill -9) is left out."""
        total, start = 0.0, None
        for s in self.launches:
            if s.get("event") == "started":
                start = s["time"]
            elif s.get("event") == "ended" and start is not None:
                total, start = total + s["time"] - start, None
        return total if self.launches else None

    def hardware(self) -> str:
        started = [s for s in self.launches if s.get("event") == "started" and "processes" in s]
        if not started:
            return "unknown"
        s = started[-1]
        return f"{s.get('processes')} x {s.get('device')}, {s.get('parallelism')}, {s.get('mixed_precision')}"

    def samples_per_s(self) -> float | None:
        _, values = self.series("train/samples_per_s")
        return sum(values) / len(values) if values else None

    def summary(self) -> dict:
        """The row of the comparison table: final metrics (else the last evaluation), best, time, speed."""
        source = self.final or {}
        if not source:
            evals = [r for r in self.records if any(k.startswith("eval/") for k in r)]
            source = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
        return {"status": self.status(), "steps": self.last_step(), **{m: source.get(m) for m in METRICS},
                "best": self.best_text(), "wall time": self.wall_time_s(), "samples/s": self.samples_per_s(),
                "hardware": self.hardware()}

    def best_text(self) -> str | None:
        train = self.config.get("train")
        metric = train.get("best_metric") if isinstance(train, dict) else None
        if not isinstance(metric, str) or not self.best or not _number(self.best.get(metric)):
            return None
        return f"{metric} {self.best.get(metric):.4f} at step {self.best.get('step')}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys (section.key) whose values differ between the runs, bar the output folder."""
    flat = [{f"{s}.{k}": v for s, sec in r.config.items() if isinstance(sec, dict) for k, v in sec.items()} for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if k != "train.output_dir" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def comparison_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (Markdown-ready strings); the best value of each metric column in bold."""
    diff = differing_keys(runs)
    summaries = [r.summary() for r in runs]
    # the metrics these runs' tasks report (a single-label run has no correlation); all where none reports any
    shown = [m for m in METRICS if any(_number(s[m]) for s in summaries)] or list(METRICS)
    header = ["run", *diff, "status", "steps", *shown, "best", "wall time (s)", "samples/s", "hardware"]
    rows = []
    for run, s in zip(runs, summaries):
        flat = {f"{sec}.{k}": v for sec, vals in run.config.items() if isinstance(vals, dict) for k, v in vals.items()}
        rows.append([run.name, *(_fmt(flat.get(k)) for k in diff), s["status"], _fmt(s["steps"]),
                     *(_fmt(s[m]) for m in shown), _fmt(s["best"]), _fmt(s["wall time"]),
                     _fmt(s["samples/s"]), s["hardware"]])
    if len(runs) > 1:
        for m in shown:
            values = [s[m] for s in summaries if _number(s[m])]
            if values:
                best = max(values) if METRICS[m] else min(values)
                col = header.index(m)
                for row, s in zip(rows, summaries):
                    if s[m] == best:
                        row[col] = f"**{row[col]}**"
    return header, rows


def markdown(runs: list[Run]) -> str:
    header, rows = comparison_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for run in runs:
        lines += [f"\n{run.name}: {cut_short(d)}" for d in run.cut_short]
        if run.model_dir is not None:
            confusion = confusion_of(run.model_dir)
            if confusion:
                lines.append(f"\n{run.name}: confusion matrix ({run.model_dir.name}/, rows true, columns predicted): "
                             + "; ".join(f"{name}: {row}" for name, row in zip(confusion["labels"], confusion["matrix"])))
    return "\n".join(lines)


def cut_short(folder: Path) -> str:
    return (f"the evaluation files in {folder.name}/ are not one whole evaluation ({verify(folder, EVALUATION)}); "
            f"not shown: run harness evaluate again")


def mistakes(model_dir: Path, n: int = 10) -> list[dict]:
    """The most confident wrong predictions of a single-label model (a name each), from the predictions.jsonl
    that `harness evaluate` wrote."""
    wrong = [p for p in Run._jsonl(model_dir / "predictions.jsonl") if isinstance(p.get("predicted"), str)
             and p.get("predicted") != p.get("label")
             and isinstance(p.get("probabilities"), dict) and _number(p["probabilities"].get(p.get("predicted")))]
    return sorted(wrong, key=lambda p: -p["probabilities"][p["predicted"]])[:n]


def confusion_of(model_dir: Path) -> dict | None:
    """confusion_matrix.json as `harness evaluate` writes it (labels, a square matrix of counts), else None."""
    confusion = Run._json(model_dir / "confusion_matrix.json")
    if confusion is None or not isinstance(confusion.get("labels"), list) or not isinstance(confusion.get("matrix"), list):
        return None
    n = len(confusion["labels"])
    square = len(confusion["matrix"]) == n and all(
        isinstance(row, list) and len(row) == n and all(isinstance(c, int) for c in row) for row in confusion["matrix"])
    return confusion if square else None


# ---------------------------------------------------------------- the page


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("report: the HTML page needs matplotlib: pip install -e '.[report]'") from None
    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def curves(runs: list[Run]) -> list[str]:
    """One figure per quantity (training curves, then every eval metric), each run a line."""
    plt = _plt()
    keys = TRAIN_CURVES + [(k, f"eval {k[5:]}") for k in sorted({k for r in runs for k in r.eval_keys()})]
    figures = []
    for key, title in keys:
        if not any(r.series(key)[0] for r in runs):
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for run in runs:
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=run.name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
        figures.append(f"<figure>{_png(fig)}<figcaption>{html.escape(title)}</figcaption></figure>")
        plt.close(fig)
    return figures


def confusion_figure(confusion: dict) -> str:
    plt = _plt()
    names, matrix = confusion["labels"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.6 * len(names)))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    out = _png(fig)
    plt.close(fig)
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        inner = html.escape(text[2:-2] if bold else text)
        return f"<td><b>{inner}</b></td>" if bold else f"<td>{inner}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(runs: list[Run]) -> str:
    header, rows = comparison_rows(runs)
    parts = [f"<h1>harness report: {html.escape(', '.join(r.name for r in runs))}</h1>",
             "<h2>Runs</h2>", _table(header, rows), "<h2>Curves</h2>", '<div class="grid">', *curves(runs), "</div>"]
    for run in runs:
        parts.append(f"<h2>{html.escape(run.name)}</h2><p>{html.escape(str(run.root))}: {run.status()}, "
                     f"hardware {html.escape(run.hardware())}</p>")
        for label, results in (("final", run.final), ("best", run.best)):
            if results:
                flat = {k: v for k, v in results.items() if not isinstance(v, dict)}
                parts.append(f"<h3>{label}/ metrics</h3>" + _table(list(flat), [[_fmt(v) for v in flat.values()]]))
                if isinstance(results.get("per_class"), dict):
                    per = results["per_class"]
                    parts.append(_table(["label", "precision", "recall", "f1", "support"],
                                        [[n, *(_fmt(v[k]) for k in ("precision", "recall", "f1", "support"))]
                                         for n, v in per.items()]))
        parts += [f"<p>{html.escape(cut_short(d))}</p>" for d in run.cut_short]
        if run.model_dir is not None:
            confusion = confusion_of(run.model_dir)
            if confusion:
                parts.append(f"<h3>Confusion matrix ({run.model_dir.name}/)</h3>" + confusion_figure(confusion))
            wrong = mistakes(run.model_dir)
            if wrong:
                parts.append("<h3>Most confident mistakes</h3>" + _table(
                    ["id", "label", "predicted", "probability", "tokens", "text (first 200 characters)"],
                    [[str(p["id"]), p["label"], p["predicted"], f"{p['probabilities'][p['predicted']]:.3f}",
                      str(p.get("tokens")), p.get("text", "")] for p in wrong]))
        parts.append("<h3>Config</h3><pre>" + html.escape(yaml.safe_dump(run.config, sort_keys=False)) + "</pre>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}figure{margin:0}"
             "figcaption{font-size:12px;color:#555;text-align:center}"
             ".grid{display:flex;flex-wrap:wrap;gap:8px}pre{background:#f6f6f6;padding:8px;font-size:12px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>harness report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def report(run_dirs: list[str], out: str | None = None) -> Path:
    """Write the page (default: report.html in the first run's folder), print the Markdown summary."""
    runs = [Run(Path(d)) for d in run_dirs]
    target = Path(out) if out else runs[0].root / "report.html"
    if not target.parent.is_dir():
        raise BadInput(f"report: --out {target}: the folder {target.parent} does not exist")
    text = page(runs)  # needs matplotlib: checked before anything is written
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(target)
    except OSError as e:  # a full disk, a quota, a folder not writable: the page is not written, nothing is left
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"could not write {target}: {e.strerror or e}") from None
    print(markdown(runs))
    print(f"\nreport: {target}")
    return target
