"""Evaluation that runs on every rank and gives every rank the same, exact metrics.

Predictions are gathered with `gather_for_metrics`, which drops the examples Accelerate repeats to even
out the last batch, so `num_examples` equals the eval set's size for any number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(model, dataloader: DataLoader, accelerator, num_labels: int) -> dict:
    was_training = model.training
    model.eval()
    preds, labels, losses = [], [], []
    for batch in dataloader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        p, y, l = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        preds.append(p.cpu())
        labels.append(y.cpu())
        losses.append(l.cpu())
    if was_training:
        model.train()
    return classification_metrics(torch.cat(preds), torch.cat(labels), torch.cat(losses), num_labels)


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, num_labels: int) -> dict:
    """Accuracy, macro precision/recall/F1 (a class never predicted or never present scores 0), mean loss."""
    n = labels.numel()
    precision, recall, f1 = [], [], []
    for c in range(num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        predicted = (preds == c).sum().item()
        actual = (labels == c).sum().item()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {
        "accuracy": (preds == labels).sum().item() / n,
        "f1": sum(f1) / num_labels,
        "precision": sum(precision) / num_labels,
        "recall": sum(recall) / num_labels,
        "loss": losses.double().mean().item(),
        "num_examples": n,
    }


def eval_dataloader(dataset, batch_size: int, collate_fn, num_workers: int = 0) -> DataLoader:
    """Longest examples first (little padding, and an out-of-memory shows at once); the order is fixed."""
    lengths = dataset["length"]
    ordered = dataset.select(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    # Its own generator: starting an epoch of it must not draw from the global RNG (training's dropout stream).
    return DataLoader(ordered, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers,
                      generator=torch.Generator())
