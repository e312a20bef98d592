"""Evaluation that runs on every rank and gives every rank the same, exact metrics.

Predictions are gathered with `gather_for_metrics`, which drops the examples Accelerate repeats to even
out the last batch, so `num_examples` equals the eval set's size for any number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


DETAILS = ("row", "length", "full_length")  # what a batch must carry (Collator extras) for `details`


@torch.no_grad()
def evaluate(model, dataloader: DataLoader, accelerator, num_labels: int, on_batch=lambda: None,
             details: dict | None = None) -> dict:
    """Metrics over the whole eval set, the same on every rank. `on_batch` is called before every batch (the
    stall watchdog's beat). With `details` (a dict to fill; the batches must carry DETAILS), every example's
    row, probabilities and token counts are gathered too, each example once: `details` gets tensors
    `row`, `label`, `pred`, `probs`, `length`, `full_length`, ordered by row."""
    was_training = model.training
    model.eval()
    preds, labels, losses, extra = [], [], [], {k: [] for k in ("probs", *DETAILS)}
    for batch in dataloader:
        on_batch()
        # token_index and offsets: a model.unpadded model packs the real tokens (its loader's batches carry them)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "token_index", "offsets") if k in batch}
        logits = model(**inputs).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        p, y, l = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        preds.append(p.cpu())
        labels.append(y.cpu())
        losses.append(l.cpu())
        if details is not None:
            gathered = accelerator.gather_for_metrics((logits.softmax(-1), *(batch[k] for k in DETAILS)))
            for key, value in zip(extra, gathered):
                extra[key].append(value.cpu())
    if was_training:
        model.train()
    preds, labels, losses = torch.cat(preds), torch.cat(labels), torch.cat(losses)
    if details is not None:
        cols = {k: torch.cat(v) for k, v in extra.items()}
        order = torch.argsort(cols["row"])
        details.update({"label": labels[order], "pred": preds[order], **{k: v[order] for k, v in cols.items()}})
    return classification_metrics(preds, labels, losses, num_labels)


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, num_labels: int) -> dict:
    """Accuracy, macro precision/recall/F1 (a class never predicted or never present scores 0), mean loss."""
    n = labels.numel()
    classes = per_class(preds, labels, [str(c) for c in range(num_labels)]).values()
    return {
        "accuracy": (preds == labels).sum().item() / n,
        "f1": sum(c["f1"] for c in classes) / num_labels,
        "precision": sum(c["precision"] for c in classes) / num_labels,
        "recall": sum(c["recall"] for c in classes) / num_labels,
        "loss": losses.double().mean().item(),
        "num_examples": n,
    }


def per_class(preds: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """{label name: precision, recall, f1, support} for every class."""
    report = {}
    for c, name in enumerate(names):
        tp = int(((preds == c) & (labels == c)).sum())
        predicted, actual = int((preds == c).sum()), int((labels == c).sum())
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        report[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": actual}
    return report


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Rows: the true label, columns: the predicted one (counts), with the label names."""
    n = len(names)
    counts = torch.bincount(labels * n + preds, minlength=n * n).reshape(n, n)
    return {"labels": names, "rows": "true label", "columns": "predicted label", "matrix": counts.tolist()}


def write_predictions(path: Path, details: dict, names: list[str], max_length: int, texts=None) -> None:
    """predictions.jsonl: one line per example, ordered by its row in the split."""
    with open(path, "w") as f:
        for i in range(len(details["row"])):
            row = {"id": int(details["row"][i]), "label": names[int(details["label"][i])],
                   "predicted": names[int(details["pred"][i])],
                   "probabilities": {n: round(float(p), 6) for n, p in zip(names, details["probs"][i])},
                   "tokens": int(details["length"][i]), "truncated": int(details["full_length"][i]) > max_length}
            if texts is not None:
                row["text"] = texts[int(details["row"][i])]
            f.write(json.dumps(row) + "\n")


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


def evaluate_saved(model_dir: str | Path, config: str | None = None, overrides=(), output: str | Path | None = None) -> dict:
    """`harness evaluate`: score a saved model on every rank, with the data and preprocessing of its
    training run (training_config.yaml beside it) unless --config names another recipe.

    Writes to `output` (default: the model's folder) eval_results.json (macro and per-class metrics),
    predictions.jsonl (every example once, by its row in the split) and confusion_matrix.json."""
    import sys

    from harness.checkpoint import TRAINING_CONFIG
    from harness.config import load_config
    from harness.data import Collator, build_split
    from harness.distributed import build_accelerator
    from harness.errors import BadInput
    from harness.modeling import check_max_length, load_trained
    from harness.schedule import eval_batch_size

    model_dir = Path(model_dir)
    if config is None and not (model_dir / TRAINING_CONFIG).is_file():
        raise BadInput(f"evaluate: {model_dir} has no {TRAINING_CONFIG} (not exported by harness): give --config RECIPE")
    cfg = load_config(config if config is not None else model_dir / TRAINING_CONFIG, overrides)
    accelerator = build_accelerator()
    model, tokenizer = load_trained(model_dir)
    num_labels = model.config.num_labels
    d = cfg.data
    check_max_length(d.max_length, model.config, tokenizer)
    output = Path(output) if output is not None else model_dir
    if output.exists() and not output.is_dir():
        raise BadInput(f"evaluate: --output {output} exists and is not a folder")
    names = [model.config.id2label[i] for i in range(num_labels)]
    with accelerator.local_main_process_first():
        ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, cfg.train.seed, cfg.model.label_names, num_labels,
                         keep_text=True)
    texts = dict(zip(ds["row"], ds["text"])) if accelerator.is_main_process else None
    dl = eval_dataloader(ds.remove_columns("text"), eval_batch_size(cfg.train),
                         Collator(tokenizer.pad_token_id or 0, extras=DETAILS, max_length=d.max_length), d.num_workers)
    model, dl = accelerator.prepare(model, dl)
    details: dict = {}
    metrics = evaluate(model, dl, accelerator, num_labels, details=details)
    metrics["per_class"] = per_class(details["pred"], details["label"], names)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_predictions(output / "predictions.jsonl", details, names, d.max_length, texts)
        (output / "confusion_matrix.json").write_text(
            json.dumps(confusion_matrix(details["pred"], details["label"], names), indent=2) + "\n")
        per = ", ".join(f"{n}: P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f} (n={v['support']})"
                        for n, v in metrics["per_class"].items())
        print(f"evaluated {metrics['num_examples']} examples on {accelerator.num_processes} process(es); {per}; "
              f"predictions in {output / 'predictions.jsonl'}", file=sys.stderr)
        print(json.dumps(metrics), flush=True)
    accelerator.end_training()
    return metrics
