"""Using a saved model: `harness evaluate` (metrics and every prediction, on every rank) and `harness predict`.

    harness evaluate --model outputs/bert_base_imdb/final                 # the data it was trained with
    harness predict --model outputs/bert_base_imdb/final "A wonderful film." "Two hours I will never get back."
    harness predict --model outputs/bert_base_imdb/final --input reviews.jsonl --probabilities
    harness predict --model outputs/bert_base_mrpc/final --input pairs.jsonl   # {"text": ..., "text_pair": ...}

A model folder's training_config.yaml (written with every export) gives the data and its preparation
(max_length, `head` or `head_tail` truncation, sentence pairs); a folder without it (any HF model) is read with
`head` truncation at the model's maximum length. Texts are tokenized by the training data's own code.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset

from harness.export import EVALUATION, TRAINING_CONFIG
from harness.checkpoint import replace_file
from harness.config import Config, DataConfig
from harness.recipes import load_config
from harness.data import Collator, build_split, eval_dataloader, model_inputs, pad_token_id, tokenize
from harness.distributed import build_accelerator
from harness.errors import BadInput
from harness.evaluation import DETAILS, confusion_matrix, evaluate, per_document
from harness.lock import hold
from harness.modeling import check_max_length, load_trained, model_length_limit
from harness.schedule import eval_batch_size
from harness.tasks import Task, per_class, saved_task


def saved_data_config(model_dir: Path, model, tokenizer) -> DataConfig:
    """How a saved model's inputs were prepared: its training_config.yaml's data section, else (a model
    from elsewhere) the head of each text up to the model's maximum length (512 where nothing says)."""
    saved = Path(model_dir) / TRAINING_CONFIG
    if saved.is_file():
        return load_config(saved).data
    limit = model_length_limit(model.config, tokenizer)
    return DataConfig(max_length=min(limit[0], 512) if limit else 512, truncation="head")


# ---------------------------------------------------------------- harness evaluate


def evaluate_saved(model_dir: str | Path, config: str | None = None, overrides=(), output: str | Path | None = None,
                   trust_remote_code: bool = False) -> dict:
    """`harness evaluate`: score a saved model on every rank, with the data and preprocessing of its
    training run (training_config.yaml beside it) unless --config names another recipe.

    Writes to `output` (default: the model's folder) eval_results.json (macro and per-class metrics),
    predictions.jsonl (every example once, by its row in the split) and confusion_matrix.json."""
    model_dir = Path(model_dir)
    if config is None and not (model_dir / TRAINING_CONFIG).is_file():
        raise BadInput(f"evaluate: {model_dir} has no {TRAINING_CONFIG} (not exported by harness): give --config RECIPE")
    cfg = load_config(config if config is not None else model_dir / TRAINING_CONFIG, overrides)
    output = Path(output) if output is not None else model_dir
    if output.exists() and not output.is_dir():
        raise BadInput(f"evaluate: --output {output} exists and is not a folder")
    accelerator = build_accelerator()
    # one evaluation at a time writes into a folder, as one run trains in one
    lock = hold(output / "run.lock", accelerator, "evaluate --output", warn=functools.partial(print, file=sys.stderr))
    try:
        return _evaluate(model_dir, cfg, output, accelerator, trust_remote_code)
    finally:
        lock.release()


def _evaluate(model_dir: Path, cfg: Config, output: Path, accelerator, trust_remote_code: bool) -> dict:
    model, tokenizer = load_trained(model_dir, trust_remote_code)
    check_max_length(cfg.data.max_length, model.config, tokenizer)
    task = saved_task(model.config)
    names = [model.config.id2label[i] for i in range(task.num_labels)]
    texts, loader = _scored_split(cfg, tokenizer, accelerator, task)
    # no DDP wrapper (nothing is trained): its process-group teardown at exit can deadlock a rank after the results
    model, loader = accelerator.prepare_model(model, evaluation_mode=True), accelerator.prepare_data_loader(loader)
    details: dict = {}
    metrics = evaluate(model, loader, accelerator, task, details=details)
    if task.kind != "regression":
        metrics["per_class"] = per_class(details["pred"], details["label"].long(), names)
    if accelerator.is_main_process:
        cut_at = cfg.data.max_length if cfg.data.truncation != "chunks" else None  # chunks cut no text
        _write_evaluation(output, metrics, details, task, names, cut_at, texts)
        per = f"{_per_class_line(metrics['per_class'])}; " if "per_class" in metrics else ""
        print(f"evaluated {metrics['num_examples']} examples on {accelerator.num_processes} process(es); "
              f"{per}predictions in {output / 'predictions.jsonl'}", file=sys.stderr)
        print(json.dumps(metrics), flush=True)
    accelerator.end_training()
    return metrics


def _scored_split(cfg: Config, tokenizer, accelerator, task: Task):
    """(the main process's {row: text head}, the eval loader whose batches carry DETAILS)."""
    d = cfg.data
    with accelerator.local_main_process_first():
        ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, cfg.train.seed, cfg.model.label_names,
                         task.num_labels, keep_text=True, kind=task.kind)
    texts = dict(zip(ds["row"], ds["text"])) if accelerator.is_main_process else None
    collate = Collator(pad_token_id(tokenizer), extras=DETAILS, max_length=d.max_length)
    return texts, eval_dataloader(ds.remove_columns("text"), eval_batch_size(cfg.train), collate, d.num_workers)


def _write_evaluation(output: Path, metrics: dict, details: dict, task: Task, names: list[str], max_length,
                      texts) -> None:
    """Each file written whole and renamed into place, the manifest last: `harness report` trusts the files only
    where the manifest lists them as they are (a `kill -9` halfway leaves none, or the last evaluation's). A
    single-label task also gets confusion_matrix.json."""
    output.mkdir(parents=True, exist_ok=True)
    (output / EVALUATION).unlink(missing_ok=True)
    replace_file(output / "eval_results.json", json.dumps(metrics, indent=2) + "\n")
    tmp = output / f"predictions.jsonl.{os.getpid()}.tmp"
    write_predictions(tmp, details, task, names, max_length, texts)
    os.replace(tmp, output / "predictions.jsonl")
    written = ["eval_results.json", "predictions.jsonl"]
    if task.kind == "single_label":
        replace_file(output / "confusion_matrix.json",
                     json.dumps(confusion_matrix(details["pred"], details["label"], names), indent=2) + "\n")
        written.append("confusion_matrix.json")
    else:
        (output / "confusion_matrix.json").unlink(missing_ok=True)  # an earlier evaluation's, of another task
    files = {name: (output / name).stat().st_size for name in written}
    replace_file(output / EVALUATION, json.dumps({"files": files}, indent=2) + "\n")


def _per_class_line(per: dict) -> str:
    return ", ".join(f"{n}: P {v['precision']:.3f} R {v['recall']:.3f} F1 {v['f1']:.3f} (n={v['support']})"
                     for n, v in per.items())


def write_predictions(path: Path, details: dict, task: Task, names: list[str], max_length, texts=None) -> None:
    """predictions.jsonl: one line per example, ordered by its row in the split: its label and prediction as the task
    has them (a name, the names of a multi-label example, or a number) and the probabilities behind them."""
    with open(path, "w") as f:
        for i in range(len(details["row"])):
            shown = task.shown(details["label"][i], details["pred"][i], details["outputs"][i], names)
            row = {"id": int(details["row"][i]), **shown, "tokens": int(details["length"][i]),
                   "truncated": max_length is not None and int(details["full_length"][i]) > max_length}
            if texts is not None:
                row["text"] = texts[int(details["row"][i])]
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- harness predict


def read_jsonl_texts(path: Path) -> list:
    """The `text` of each line, or (text, text_pair) where a line has a `text_pair` (sentence-pair models)."""
    if not path.is_file():
        raise BadInput(f"--input file not found: {path}")
    texts = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{path} line {n}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise BadInput(f"{path} line {n}: expected an object with a string 'text' field")
        if "text_pair" in row and not isinstance(row["text_pair"], str):
            raise BadInput(f"{path} line {n}: 'text_pair' must be a string")
        texts.append((row["text"], row["text_pair"]) if "text_pair" in row else row["text"])
    return texts


def predict(model_dir: str | Path, texts: list, batch_size: int = 32, probabilities: bool = False,
            trust_remote_code: bool = False) -> list[dict]:
    """One dict per input, in input order: text (and text_pair) and what the task predicts (Task.prediction).
    An input is a string, or a (text, text_pair) tuple for a model trained on sentence pairs. Batches go
    longest first (little padding), on the GPU where there is one."""
    if batch_size < 1:
        raise BadInput(f"predict: --batch-size must be at least 1, got {batch_size}")
    model, tokenizer = load_trained(model_dir, trust_remote_code)
    task = saved_task(model.config)
    names = [model.config.id2label[i] for i in range(task.num_labels)]
    data = saved_data_config(Path(model_dir), model, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    ds = tokenize(Dataset.from_dict(_input_columns(texts, data, model_dir)), tokenizer, data)
    order = sorted(range(len(ds)), key=lambda i: -ds[i]["length"])
    collate = Collator(pad_token_id(tokenizer), max_length=data.max_length)
    logits = torch.empty(len(ds), task.num_labels)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([ds[i] for i in idx])
            logits[idx] = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits.float().cpu()
    if "doc" in ds.column_names:  # data.truncation=chunks: an input's windows, scored together
        logits = per_document({"logits": logits, "doc": torch.as_tensor(ds["doc"])})["logits"]
    results = []
    for text, outputs in zip(texts, task.outputs(logits)):
        shown = {"text": text[0], "text_pair": text[1]} if isinstance(text, tuple) else {"text": text}
        results.append({**shown, **task.prediction(outputs, names, probabilities)})
    return results


def _input_columns(texts: list, data: DataConfig, model_dir) -> dict:
    """The inputs as the columns the model's data config names; pairs only for a model trained on pairs."""
    paired = [isinstance(t, tuple) for t in texts]
    columns = {data.text_column: [t[0] if p else t for t, p in zip(texts, paired)], data.label_column: [0] * len(texts)}
    if data.text_pair_column:
        if not all(paired):
            raise BadInput(f"predict: {model_dir} was trained on sentence pairs: give --input FILE.jsonl with "
                           "'text' and 'text_pair' on every line")
        columns[data.text_pair_column] = [t[1] for t in texts]
    elif any(paired):
        raise BadInput(f"predict: {model_dir} was trained on single texts; remove 'text_pair' from the input")
    return columns
