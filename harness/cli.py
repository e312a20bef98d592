"""Command line: `harness train | evaluate | predict | plan | report | reference`.

    harness train --config configs/quickstart.yaml train.max_steps=20
    harness evaluate --model outputs/quickstart/final                 # the data and preprocessing it was trained with
    harness predict --model outputs/quickstart/final "a wonderful film" "a dull plot"
    harness predict --model outputs/quickstart/final --input reviews.jsonl
    harness plan --config configs/bert_base_imdb.yaml --launch-config launch_configs/accelerate/deepspeed_zero2.yaml
    harness report outputs/run-a outputs/run-b --out compare.html

Errors are one line on stderr, with the exit codes of harness.errors; under `accelerate launch` the ranks exit
with these and the launcher itself exits 1; OUTPUT_DIR/stop_reason.txt says why a run stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness.errors import KNOWN_ERRORS, BadInput, exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors are bad input too: exit 2, one line
        command = self.prog.removeprefix("harness").strip()  # main() says "harness: error:" once
        raise BadInput(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Fine-tune pre-trained encoders for sequence classification.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="fine-tune a model (run under `accelerate launch` for several processes)")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/bert_base_imdb.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=3e-5")

    p = sub.add_parser("evaluate", help="score a saved model on the config's eval split")
    p.add_argument("--model", required=True, help="folder of a saved model (e.g. OUTPUT_DIR/final)")
    p.add_argument("--config", help="recipe naming the data to score on (default: the model's training_config.yaml)")
    p.add_argument("--output", help="folder for eval_results.json, predictions.jsonl, confusion_matrix.json "
                                    "(default: the model's folder)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model folder")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("plan", help="check a config and launch before starting anything: sizes, steps, DeepSpeed")
    p.add_argument("--config", required=True)
    p.add_argument("--launch-config", help="the accelerate launch config the job will use")
    p.add_argument("--nodes", type=int, help="number of nodes (default: Slurm's, else the launch config's)")
    p.add_argument("--gpus-per-node", type=int, help="processes per node (default: Slurm's, else the launch config's)")
    p.add_argument("--get", metavar="KEY", help="print one resolved config value (e.g. train.output_dir) and exit")
    p.add_argument("--status", action="store_true",
                   help="print what train would do with train.output_dir: finished, resume PATH or fresh (for scripts)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    p = sub.add_parser("report", help="one HTML page (curves, metrics, errors) and a Markdown table for runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train.output_dir), one or several")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html of the first run)")

    sub.add_parser("reference", help="print the config reference (every key, its default and meaning) as Markdown")

    p = sub.add_parser("predict", help="classify texts with a saved model")
    p.add_argument("--model", required=True, help="folder of a saved model")
    p.add_argument("--input", help="JSON-lines file with a 'text' field per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--probabilities", action="store_true", help="also print the probability of every label")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped in the model folder")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork deadlocks with dataloader workers
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            from harness.recipes import load_config
            from harness.trainer import train

            train(load_config(args.config, args.overrides))
        elif args.command == "evaluate":
            from harness.inference import evaluate_saved

            evaluate_saved(args.model, args.config, args.overrides, args.output, args.trust_remote_code)
        elif args.command == "predict":
            run_predict(args)
        elif args.command == "plan":
            run_plan(args)
        elif args.command == "reference":
            from harness.reference import markdown

            print(markdown(), end="")
        elif args.command == "report":
            from harness.report import report

            report(args.runs, args.out)
        return 0
    except KNOWN_ERRORS as e:
        print(f"harness: error: {e}", file=sys.stderr)
        _leave_process_group()
        return exit_code(e)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


def _leave_process_group() -> None:
    """Every rank stops on the same error: leave the process group cleanly, so that no rank is aborted by
    the teardown of a group whose peers already left (SIGABRT instead of the exit code)."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:  # the ranks leave together: none closes its connections while a peer still talks over them
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=10))
        except Exception:  # a rank that stopped alone: the others are not coming, leave anyway
            pass
        try:
            dist.destroy_process_group()
        except Exception:  # the error is already reported; nothing more to do here
            pass


def run_plan(args) -> None:
    from harness.recipes import load_config
    from harness.plan import describe, get_value, plan

    cfg = load_config(args.config, args.overrides)
    if args.get:
        print(get_value(cfg, args.get))
        return
    if args.status:
        from harness.run_folder import RunFolder

        print(RunFolder(cfg.train.output_dir).status(cfg))
        return
    for flag in ("nodes", "gpus_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise BadInput(f"plan: --{flag.replace('_', '-')} must be at least 1, got {value}")
    print(describe(cfg, plan(cfg, args.launch_config, args.nodes, args.gpus_per_node)))


def run_predict(args) -> None:
    from harness.inference import predict, read_jsonl_texts

    texts = list(args.texts)
    if args.input:
        texts.extend(read_jsonl_texts(Path(args.input)))
    if not texts:
        raise BadInput("predict: give TEXT arguments or --input FILE.jsonl")
    for row in predict(args.model, texts, args.batch_size, args.probabilities, args.trust_remote_code):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
