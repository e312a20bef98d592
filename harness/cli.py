"""Command line: `harness train | evaluate | predict | plan`.

    harness train --config configs/quickstart.yaml train.max_steps=20
    harness evaluate --model outputs/quickstart/final --config configs/quickstart.yaml
    harness predict --model outputs/quickstart/final "a wonderful film" "a dull plot"
    harness predict --model outputs/quickstart/final --input reviews.jsonl
    harness plan --config configs/bert_base_imdb.yaml --launch-config launch_configs/accelerate/deepspeed_zero2.yaml

Exit codes: 0 success; 2 bad input (one line on stderr naming the key, file or value); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness.errors import BadInput


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors are bad input too: exit 2, one line
        raise BadInput(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Fine-tune pre-trained encoders for sequence classification.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="fine-tune a model (run under `accelerate launch` for several processes)")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/bert_base_imdb.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=3e-5")

    p = sub.add_parser("evaluate", help="score a saved model on the config's eval split")
    p.add_argument("--model", required=True, help="folder of a saved model (e.g. OUTPUT_DIR/final)")
    p.add_argument("--config", required=True, help="recipe naming the data to score on")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("plan", help="check a config and launch before starting anything: sizes, steps, DeepSpeed")
    p.add_argument("--config", required=True)
    p.add_argument("--launch-config", help="the accelerate launch config the job will use")
    p.add_argument("--nodes", type=int, help="number of nodes (default: Slurm's, else the launch config's)")
    p.add_argument("--gpus-per-node", type=int, help="processes per node (default: Slurm's, else the launch config's)")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. train.output_dir) and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("predict", help="classify texts with a saved model")
    p.add_argument("--model", required=True, help="folder of a saved model")
    p.add_argument("--input", help="JSON-lines file with a 'text' field per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork deadlocks with dataloader workers
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            from harness.config import load_config
            from harness.trainer import train

            train(load_config(args.config, args.overrides))
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "predict":
            run_predict(args)
        elif args.command == "plan":
            run_plan(args)
        return 0
    except BadInput as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


def run_evaluate(args) -> dict:
    from harness.config import load_config
    from harness.data import Collator, build_split
    from harness.distributed import build_accelerator
    from harness.evaluation import eval_dataloader, evaluate
    from harness.modeling import load_trained

    cfg = load_config(args.config, args.overrides)
    model_dir = Path(args.model)
    accelerator = build_accelerator()
    model, tokenizer = load_trained(model_dir)
    num_labels = model.config.num_labels
    d = cfg.data
    with accelerator.local_main_process_first():
        ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, cfg.train.seed, cfg.model.label_names, num_labels)
    dl = eval_dataloader(ds, cfg.train.eval_batch_size or 2 * cfg.train.per_device_batch_size,
                         Collator(tokenizer.pad_token_id or 0), d.num_workers)
    model, dl = accelerator.prepare(model, dl)
    metrics = evaluate(model, dl, accelerator, num_labels)
    if accelerator.is_main_process:
        (model_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"evaluated {metrics['num_examples']} examples on {accelerator.num_processes} process(es)", file=sys.stderr)
        print(json.dumps(metrics), flush=True)
    accelerator.end_training()
    return metrics


def run_plan(args) -> None:
    from harness.config import load_config
    from harness.plan import describe, get_value, plan

    cfg = load_config(args.config, args.overrides)
    if args.get:
        print(get_value(cfg, args.get))
        return
    for flag in ("nodes", "gpus_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BadInput(f"plan: --{flag.replace('_', '-')} must be at least 1, got {value}")
    print(describe(cfg, plan(cfg, args.launch_config, args.nodes, args.gpus_per_node)))


def run_predict(args) -> None:
    import torch

    from harness.modeling import load_trained

    texts = list(args.texts)
    if args.input:
        texts.extend(_read_jsonl_texts(Path(args.input)))
    if not texts:
        raise BadInput("predict: give TEXT arguments or --input FILE.jsonl")
    if args.batch_size < 1:
        raise BadInput(f"predict: --batch-size must be at least 1, got {args.batch_size}")
    model, tokenizer = load_trained(args.model)
    model.eval()
    id2label = model.config.id2label
    max_length = min(getattr(model.config, "max_position_embeddings", 512), tokenizer.model_max_length, 512)
    with torch.no_grad():
        for i in range(0, len(texts), args.batch_size):
            chunk = texts[i : i + args.batch_size]
            enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            enc.pop("token_type_ids", None)
            probs = model(**enc).logits.float().softmax(-1)
            for text, p in zip(chunk, probs):
                k = int(p.argmax())
                print(json.dumps({"text": text, "label": id2label[k], "score": round(float(p[k]), 6)}), flush=True)


def _read_jsonl_texts(path: Path) -> list[str]:
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


if __name__ == "__main__":
    raise SystemExit(main())
