"""Evaluation that runs on every rank and gives every rank the same, exact metrics.

Predictions are gathered with `gather_for_metrics`, which drops the examples Accelerate repeats to even
out the last batch, so `num_examples` equals the eval set's size for any number of processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(model, dataloader: DataLoader, accelerator, num_labels: int, on_batch=lambda: None) -> dict:
    """`on_batch` is called after every batch (the stall watchdog's beat)."""
    was_training = model.training
    model.eval()
    preds, labels, losses = [], [], []
    for batch in dataloader:
        on_batch()
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


def saved_data_config(model_dir: Path, model, tokenizer):
    """How a saved model's inputs were prepared: its training_config.yaml's data section, else (a model
    from elsewhere) the head of each text up to the model's maximum length."""
    from harness.checkpoint import TRAINING_CONFIG
    from harness.config import DataConfig, load_config

    saved = Path(model_dir) / TRAINING_CONFIG
    if saved.is_file():
        return load_config(saved).data
    limit = min(getattr(model.config, "max_position_embeddings", 512), tokenizer.model_max_length, 512)
    return DataConfig(max_length=limit, truncation="head")


def evaluate_saved(model_dir: str | Path, config: str | None = None, overrides=()) -> dict:
    """`harness evaluate`: score a saved model on every rank, with the data and preprocessing of its
    training run (training_config.yaml beside it) unless --config names another recipe."""
    import json
    import sys

    from harness.checkpoint import TRAINING_CONFIG
    from harness.config import load_config
    from harness.data import Collator, build_split
    from harness.distributed import build_accelerator
    from harness.errors import BadInput
    from harness.modeling import load_trained
    from harness.schedule import eval_batch_size

    model_dir = Path(model_dir)
    if config is None and not (model_dir / TRAINING_CONFIG).is_file():
        raise BadInput(f"evaluate: {model_dir} has no {TRAINING_CONFIG} (not exported by harness): give --config RECIPE")
    cfg = load_config(config if config is not None else model_dir / TRAINING_CONFIG, overrides)
    accelerator = build_accelerator()
    model, tokenizer = load_trained(model_dir)
    num_labels = model.config.num_labels
    d = cfg.data
    with accelerator.local_main_process_first():
        ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, cfg.train.seed, cfg.model.label_names, num_labels)
    dl = eval_dataloader(ds, eval_batch_size(cfg.train), Collator(tokenizer.pad_token_id or 0), d.num_workers)
    model, dl = accelerator.prepare(model, dl)
    metrics = evaluate(model, dl, accelerator, num_labels)
    if accelerator.is_main_process:
        (model_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"evaluated {metrics['num_examples']} examples on {accelerator.num_processes} process(es)", file=sys.stderr)
        print(json.dumps(metrics), flush=True)
    accelerator.end_training()
    return metrics
