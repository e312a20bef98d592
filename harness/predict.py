"""`harness predict`: classify texts with a saved model, prepared the way it was trained.

    harness predict --model outputs/bert_base_imdb/final "A wonderful film." "Two hours I will never get back."
    harness predict --model outputs/bert_base_imdb/final --input reviews.jsonl --probabilities
    harness predict --model outputs/bert_base_mrpc/final --input pairs.jsonl   # {"text": ..., "text_pair": ...}

The model folder's training_config.yaml (written with every export) gives max_length and the truncation
policy (`head` or `head_tail`); a folder without it (any HF model) is read with `head` at the model's
maximum length. Texts are tokenized by the same code as the training data, batched by length (little
padding), run on the GPU where there is one, and printed in input order, one JSON object a line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import BadInput


def read_jsonl_texts(path: Path) -> list:
    """The `text` of each line, or (text, text_pair) where a line has a `text_pair` (sentence-pair models)."""
    if not path.is_file():
        raise BadInput(f"--input file not found: {path}")
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
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


def predict(model_dir: str | Path, texts: list, batch_size: int = 32, probabilities: bool = False):
    """One dict per input, in input order: text (and text_pair), label, score (and every label's probability).
    An input is a string, or a (text, text_pair) tuple for a model trained on sentence pairs."""
    from datasets import Dataset

    from harness.data import Collator, tokenize
    from harness.evaluation import saved_data_config
    from harness.modeling import load_trained

    if batch_size < 1:
        raise BadInput(f"predict: --batch-size must be at least 1, got {batch_size}")
    model, tokenizer = load_trained(model_dir)
    data = saved_data_config(Path(model_dir), model, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    paired = [isinstance(t, tuple) for t in texts]
    columns = {data.text_column: [t[0] if p else t for t, p in zip(texts, paired)], data.label_column: [0] * len(texts)}
    if data.text_pair_column:
        if not all(paired):
            raise BadInput(f"predict: {model_dir} was trained on sentence pairs: give --input FILE.jsonl with "
                           "'text' and 'text_pair' on every line")
        columns[data.text_pair_column] = [t[1] for t in texts]
    elif any(paired):
        raise BadInput(f"predict: {model_dir} was trained on single texts; remove 'text_pair' from the input")
    ds = tokenize(Dataset.from_dict(columns), tokenizer, data)
    order = sorted(range(len(ds)), key=lambda i: -ds[i]["length"])  # longest first: little padding per batch
    collate = Collator(tokenizer.pad_token_id or 0, max_length=data.max_length)
    id2label = model.config.id2label
    results: list = [None] * len(texts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([ds[i] for i in idx])
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
            for i, p in zip(idx, logits.float().softmax(-1).cpu()):
                k = int(p.argmax())
                text = {"text": texts[i][0], "text_pair": texts[i][1]} if paired[i] else {"text": texts[i]}
                row = {**text, "label": id2label[k], "score": round(float(p[k]), 6)}
                if probabilities:
                    row["probabilities"] = {id2label[j]: round(float(p[j]), 6) for j in range(len(p))}
                results[i] = row
    return results
