"""Task shapes (model.problem_type): single-label and multi-label classification and regression, each with its loss,
its metrics over a whole evaluation set, and what its predictions show.

Every metric is computed from the whole set's gathered outputs, so it is exact and the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from harness.config import ModelConfig

# model.problem_type -> what transformers' config calls it (pipeline reads it: softmax, sigmoid or the raw value)
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}
THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # what model.threshold=tune chooses from


@dataclass
class Task:
    kind: str
    num_labels: int
    threshold: Union[float, str] = 0.5
    """Multi-label: a label is predicted where its probability is at least this; `tune`: the one of THRESHOLDS
    with the best micro F1 on the evaluation set."""
    class_weights: Optional[torch.Tensor] = None
    """Single-label: the training loss's weight of each class."""

    @classmethod
    def of(cls, m: ModelConfig) -> "Task":
        return cls(m.problem_type, m.num_labels, m.threshold)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", weighted: bool = False):
        """In fp32 whatever the logits' dtype; per example with reduction `none`. `weighted`: the class weights
        (training only: an evaluation's loss stays comparable across runs)."""
        logits = logits.float()
        if self.kind == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction=reduction)
        if self.kind == "multi_label":
            losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
            return losses if reduction == "none" else losses.mean()
        weight = self.class_weights.to(logits.device) if weighted and self.class_weights is not None else None
        return F.cross_entropy(logits, labels, weight=weight, reduction=reduction)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each example's probabilities (softmax, or sigmoid per label), or its predicted value (regression)."""
        logits = logits.float()
        if self.kind == "regression":
            return logits.squeeze(-1)
        return logits.sigmoid() if self.kind == "multi_label" else logits.softmax(-1)

    def decide(self, outputs: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
        """Predictions from `outputs`: class ids, 0/1 per label (at `threshold`), or the values themselves."""
        if self.kind == "single_label":
            return outputs.argmax(-1)
        if self.kind == "multi_label":
            return (outputs >= (self.threshold if threshold is None else threshold)).long()
        return outputs

    def shown(self, label, pred, outputs, names: list[str]) -> dict:
        """One example of `harness evaluate`'s predictions.jsonl: its label and prediction as the task has them (a
        name, the list of names of a multi-label example, or a number) and every label's probability."""
        if self.kind == "regression":
            return {"label": round(float(label), 6), "predicted": round(float(pred), 6)}
        probabilities = {n: round(float(p), 6) for n, p in zip(names, outputs)}
        if self.kind == "multi_label":
            return {"label": [n for n, y in zip(names, label) if y], "predicted": [n for n, y in zip(names, pred) if y],
                    "probabilities": probabilities}
        return {"label": names[int(label)], "predicted": names[int(pred)], "probabilities": probabilities}

    def prediction(self, outputs: torch.Tensor, names: list[str], probabilities: bool) -> dict:
        """What `harness predict` shows for one input: the label and its probability, the labels at or above the
        threshold with theirs (multi-label), or the predicted number (regression); with `probabilities`, every
        label's too."""
        if self.kind == "regression":
            return {"score": round(float(outputs), 6)}
        if self.kind == "multi_label":
            chosen = self.decide(outputs).nonzero().flatten().tolist()
            row = {"labels": [names[j] for j in chosen], "scores": [round(float(outputs[j]), 6) for j in chosen]}
        else:
            k = int(outputs.argmax())
            row = {"label": names[k], "score": round(float(outputs[k]), 6)}
        if probabilities:
            row["probabilities"] = {n: round(float(p), 6) for n, p in zip(names, outputs)}
        return row

    def metrics(self, outputs: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> dict:
        """The task's metrics over a whole set (see config.TASK_METRICS), its mean loss and size; a multi-label
        task also reports the threshold it decided at."""
        if self.kind == "regression":
            found = regression_metrics(outputs, labels.float())
        elif self.kind == "multi_label":
            threshold = self.threshold if self.threshold != "tune" else tune_threshold(outputs, labels)
            found = {**multi_label_metrics(self.decide(outputs, threshold), labels.long()), "threshold": threshold}
        else:
            found = single_label_metrics(outputs.argmax(-1), labels, self.num_labels)
        return {**found, "loss": losses.double().mean().item(), "num_examples": labels.shape[0]}


def saved_task(model_config) -> Task:
    """The task a saved model was trained for, from its config.json: problem_type (where missing, transformers'
    rule: one label is regression), num_labels and the decision_threshold harness saves with multi-label models."""
    kinds = {hf: kind for kind, hf in HF_PROBLEM_TYPES.items()}
    kind = kinds.get(model_config.problem_type) or ("regression" if model_config.num_labels == 1 else "single_label")
    return Task(kind, model_config.num_labels, getattr(model_config, "decision_threshold", None) or 0.5)


def single_label_metrics(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """Accuracy, macro precision/recall/F1 (a class never predicted or never present scores 0)."""
    classes = per_class(preds, labels, [str(c) for c in range(num_labels)]).values()
    return {"accuracy": (preds == labels).sum().item() / labels.numel(),
            **{k: sum(c[k] for c in classes) / num_labels for k in ("f1", "precision", "recall")}}


def per_class(preds: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """{label name: precision, recall, f1, support} for every class (single-label ids, or multi-label 0/1 rows)."""
    report = {}
    for c, name in enumerate(names):
        predicted, actual = (preds == c, labels == c) if preds.dim() == 1 else (preds[:, c] == 1, labels[:, c] == 1)
        report[name] = _scores(int((predicted & actual).sum()), int(predicted.sum()), int(actual.sum()))
    return report


def _scores(tp: int, predicted: int, actual: int) -> dict:
    p = tp / predicted if predicted else 0.0
    r = tp / actual if actual else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": actual}


def multi_label_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """Exact-match accuracy (every label of an example right), macro precision/recall/F1 over labels, micro F1."""
    labels_ = per_class(preds, labels, [str(c) for c in range(labels.shape[1])]).values()
    micro = _scores(int((preds * labels).sum()), int(preds.sum()), int(labels.sum()))
    return {"accuracy": (preds == labels).all(-1).double().mean().item(),
            **{k: sum(c[k] for c in labels_) / labels.shape[1] for k in ("f1", "precision", "recall")},
            "f1_micro": micro["f1"]}


def tune_threshold(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold of THRESHOLDS with the best micro F1 (the lowest of equals)."""
    scores = [multi_label_metrics((probs >= t).long(), labels.long())["f1_micro"] for t in THRESHOLDS]
    return float(THRESHOLDS[int(np.argmax(scores))])


def regression_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pearson and Spearman correlation (0 where either side is constant) and root mean squared error."""
    p, y = preds.double().numpy(), labels.double().numpy()
    return {"pearson": _pearson(p, y), "spearman": _pearson(_ranks(p), _ranks(y)),
            "rmse": float(np.sqrt(np.mean((p - y) ** 2)))}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / scale) if scale > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as Spearman's coefficient takes them)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def class_weights(labels: list[int], num_labels: int, configured) -> Optional[torch.Tensor]:
    """train.class_weights: `auto` weighs each class by n / (classes x its count) (a class absent from the
    training set gets 0), a list as given, null none."""
    if configured is None:
        return None
    if configured == "auto":
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
        return torch.tensor(np.where(counts > 0, len(labels) / (num_labels * np.maximum(counts, 1)), 0.0),
                            dtype=torch.float32)
    return torch.tensor(configured, dtype=torch.float32)


def mean_by_document(logits: torch.Tensor, doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (data.truncation=chunks) as documents: (each document's logits, the mean of its windows' in fp32,
    the index of its first window), documents in order of their ids. Differentiable: training takes a loss on it."""
    docs, inverse = torch.unique(doc, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(docs)).unsqueeze(-1)
    sums = torch.zeros(len(docs), logits.shape[-1], device=logits.device).index_add(0, inverse, logits.float())
    first = torch.zeros(len(docs), dtype=torch.long, device=doc.device).scatter_reduce(
        0, inverse, torch.arange(len(inverse), device=doc.device), reduce="amin", include_self=False)
    return sums / counts, first
