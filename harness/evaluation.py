"""Evaluation on every rank, with the same exact metrics on every rank, and when a run evaluates and keeps its best.

Outputs are gathered with `gather_for_metrics`, which drops the examples Accelerate repeats to even
out the last batch, so `num_examples` equals the eval set's size for any number of processes.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from harness.checkpoint import Progress
from harness.config import METRICS, TrainConfig
from harness.data import model_inputs
from harness.tasks import Task, mean_by_document

DETAILS = ("row", "length", "full_length")  # what a batch must carry (Collator extras) for `details`


@torch.no_grad()
def evaluate(model, dataloader: DataLoader, accelerator, task: Task, on_batch=lambda: None,
             details: dict | None = None) -> dict:
    """The task's metrics over the whole eval set, the same on every rank. `on_batch` is called before every
    batch (the stall watchdog's beat). Batches of windows (data.truncation=chunks: they carry `doc`) are scored per
    document, by the mean of its windows' logits, wherever its windows ran. With `details` (a dict to fill; the
    batches must carry DETAILS), every example's row and token counts are kept too, each example once: `details`
    gets tensors `row`, `label`, `outputs` (probabilities, or values for regression), `pred`, `length`,
    `full_length`, ordered by row."""
    was_training = model.training
    model.eval()
    keys = ("logits", "label", *(("doc",) if _has_docs(dataloader) else ()), *(DETAILS if details is not None else ()))
    gathered = {k: [] for k in keys}
    for batch in dataloader:
        on_batch()
        values = (model(**model_inputs(batch)).logits.float(), batch["labels"], *(batch[k] for k in keys[2:]))
        for key, value in zip(keys, accelerator.gather_for_metrics(values)):
            gathered[key].append(value.cpu())
    if was_training:
        model.train()
    cols = {k: torch.cat(v) for k, v in gathered.items()}
    if "doc" in cols:
        cols = per_document(cols)
    outputs = task.outputs(cols["logits"])
    metrics = task.metrics(outputs, cols["label"], task.loss(cols["logits"], cols["label"], reduction="none"))
    if details is not None:
        order = torch.argsort(cols["row"])
        details.update({k: v[order] for k, v in cols.items() if k in ("label", *DETAILS)}, outputs=outputs[order])
        details["pred"] = task.decide(details["outputs"], metrics.get("threshold"))
    return metrics


def _has_docs(dataloader: DataLoader) -> bool:
    """Whether the set is windows of documents (data.truncation=chunks): its dataset has their `doc` column."""
    return "doc" in getattr(dataloader.dataset, "column_names", ())


def per_document(cols: dict) -> dict:
    """Windows gathered from every rank, as documents: each document's logits are the mean of its windows', its
    label and row its own, its token count all of its tokens (none was cut)."""
    logits, first = mean_by_document(cols["logits"], cols["doc"])
    out = {k: v[first] for k, v in cols.items() if k not in ("logits", "doc")}
    if "full_length" in out:
        out["length"] = out["full_length"]
    return {**out, "logits": logits}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Rows: the true label, columns: the predicted one (counts), with the label names."""
    n = len(names)
    counts = torch.bincount(labels * n + preds, minlength=n * n).reshape(n, n)
    return {"labels": names, "rows": "true label", "columns": "predicted label", "matrix": counts.tolist()}


class Evaluator:
    """When a run evaluates (train.eval_every, and at the end), what it keeps (best/, by train.best_metric) and
    when it stops early (train.early_stopping_*). The metrics are the same on every rank: so is every decision."""

    def __init__(self, t: TrainConfig, task: Task, accelerator, model, loader, log, exporter, best_dir, guard,
                 watchdog, say):
        self.t, self.task, self.accelerator, self.model, self.loader = t, task, accelerator, model, loader
        self.log, self.exporter, self.best_dir, self.guard, self.watchdog, self.say = (
            log, exporter, best_dir, guard, watchdog, say)
        self.last_step, self.metrics = -1, {}

    def maybe_run(self, state: Progress, epoch_ended: bool = False) -> None:
        """After a step (`epoch_ended`: after the last step of an epoch), if the cadence says so."""
        every = self.t.eval_every
        if (every == "epoch") if epoch_ended else (isinstance(every, int) and state.step % every == 0):
            if self.last_step != state.step:
                self.run(state)

    def final(self, state: Progress) -> dict:
        """The metrics of the model as it ends: evaluated now unless this step was."""
        if self.last_step != state.step:
            self.run(state)
        return self.metrics

    def run(self, state: Progress) -> dict:
        self.guard.check()
        # a compiled model evaluates eagerly: a second (no-grad) graph per padded length would cost compile time
        # (and CUDA-graph memory) for batches at which the GPU is busy anyway
        with torch.compiler.set_stance("force_eager" if self.t.compile else "default"):
            metrics = evaluate(self.model, self.loader, self.accelerator, self.task, on_batch=self.watchdog.beat)
        self.log.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
        self.say(f"step {state.step}: " + ", ".join(
            f"eval {k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if self.t.best_metric is not None:
            self._keep_best(state, metrics)
        self.last_step, self.metrics = state.step, metrics
        return metrics

    def _keep_best(self, state: Progress, metrics: dict) -> None:
        value, higher = metrics[self.t.best_metric], METRICS[self.t.best_metric]
        gain = None if state.best_value is None else (value - state.best_value if higher else state.best_value - value)
        if gain is None or gain > 0:
            state.best_value, state.best_step = value, state.step
            self.exporter.export(self.best_dir, {"step": state.step, **metrics})
        if gain is None or gain > self.t.early_stopping_min_delta:
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1

    def stop_early(self, state: Progress) -> bool:
        patience = self.t.early_stopping_patience
        return bool(patience) and state.evals_without_improvement >= patience
