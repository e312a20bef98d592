"""`harness predict`: classify texts with a saved model, prepared the way it was trained.

    harness predict --model outputs/bert_base_imdb/final "A wonderful film." "Two hours I will never get back."
    harness predict --model outputs/bert_base_imdb/final --input reviews.jsonl --probabilities

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


def read_jsonl_texts(path: Path) -> list[str]:
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
        texts.append(row["text"])
    return texts


def predict(model_dir: str | Path, texts: list[str], batch_size: int = 32, probabilities: bool = False):
    """Yield one dict per text, in input order: text, label, score (and every label's probability)."""
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
    ds = tokenize(Dataset.from_dict({data.text_column: texts, data.label_column: [0] * len(texts)}), tokenizer, data)
    order = sorted(range(len(ds)), key=lambda i: -ds[i]["length"])  # longest first: little padding per batch
    collate = Collator(tokenizer.pad_token_id or 0)
    id2label = model.config.id2label
    results: list = [None] * len(texts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([ds[i] for i in idx])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            for i, p in zip(idx, logits.float().softmax(-1).cpu()):
                k = int(p.argmax())
                row = {"text": texts[i], "label": id2label[k], "score": round(float(p[k]), 6)}
                if probabilities:
                    row["probabilities"] = {id2label[j]: round(float(p[j]), 6) for j in range(len(p))}
                results[i] = row
    return results
