"""The training loop, top to bottom.

    harness train --config configs/quickstart.yaml                        # one process (CPU or one GPU)
    accelerate launch --config_file launch_configs/accelerate/multi_gpu.yaml \\
        -m harness train --config configs/bert_base_imdb.yaml train.max_steps=200

Every rank runs every line of `train`: evaluation, saving and the stop decision are collective, and
only the few places that write files check for the main process.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harness.checkpoint import check_output_dir, save_model
from harness.config import Config, warmup_steps_for
from harness.data import Collator, StepBatchSampler, build_split
from harness.distributed import build_accelerator
from harness.evaluation import eval_dataloader, evaluate
from harness.modeling import build_optimizer, linear_schedule, load_model, load_tokenizer


class MetricsLog:
    """`metrics.jsonl` and TensorBoard, written by the main process only (one event file per run)."""

    def __init__(self, out: Path, enabled: bool, fresh: bool):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.path = out / "metrics.jsonl"

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(cfg: Config) -> dict:
    t, d = cfg.train, cfg.data
    out = Path(t.output_dir)
    if check_output_dir(cfg) == "finished":
        print(f"{out} already holds a finished run of this config ({out / 'final'}); nothing to do")
        return {}
    accelerator = build_accelerator(t.grad_accum_steps)
    set_seed(t.seed)

    # Data: each node's first process tokenizes and fills the datasets cache, the others read it.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    with accelerator.local_main_process_first():
        train_ds = build_split(d, d.train_split, tokenizer, d.train_samples, t.seed, cfg.model.label_names, cfg.model.num_labels)
        eval_ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, t.seed, cfg.model.label_names, cfg.model.num_labels)
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    sampler = StepBatchSampler(
        train_ds["length"], t.per_device_batch_size, t.grad_accum_steps,
        accelerator.num_processes, accelerator.process_index, t.seed, d.group_by_length,
    )
    # Not passed to prepare(): the sampler already gives each rank its own batches.
    train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=d.num_workers,
                          pin_memory=torch.cuda.is_available())
    eval_dl = eval_dataloader(eval_ds, t.eval_batch_size or 2 * t.per_device_batch_size, collate, d.num_workers)

    # Schedule in optimizer steps for this world size and accumulation.
    steps_per_epoch = sampler.steps()
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = warmup_steps_for(t, total_steps)

    model = load_model(cfg.model)
    optimizer = build_optimizer(model, t.lr, t.weight_decay)
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    model, optimizer, scheduler, eval_dl = accelerator.prepare(model, optimizer, scheduler, eval_dl)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    log = MetricsLog(out, accelerator.is_main_process, fresh=True)
    accelerator.print(
        f"train: {len(train_ds)} examples, eval: {len(eval_ds)}; {accelerator.num_processes} process(es) x "
        f"batch {t.per_device_batch_size} x accumulation {t.grad_accum_steps} = {sampler.global_batch} per step; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup}"
    )

    step, last_eval_step, metrics = 0, -1, {}
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_local_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches = samples = real_tokens = padded_tokens = 0
    samples_seen = 0  # all ranks together, since the start of training
    grad_norm = None
    tic = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in train_dl:
            # Counted on the host before the copy, so logging needs no device synchronisation.
            samples += batch["labels"].numel()
            real_tokens += int(batch["attention_mask"].sum())
            padded_tokens += batch["attention_mask"].numel()
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            progress.update(1)

            if step % t.log_every == 0 or step == total_steps:
                counts = torch.tensor([micro_batches, samples, real_tokens, padded_tokens], dtype=torch.float32)
                totals = accelerator.reduce(torch.cat([loss_sum.float().reshape(1), counts.to(accelerator.device)]), "sum").tolist()
                elapsed = time.perf_counter() - tic
                samples_seen += int(totals[2])
                record = {
                    "train/loss": totals[0] / totals[1],
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": step / steps_per_epoch,
                    "train/samples_per_s": totals[2] / elapsed,
                    "train/tokens_per_s": totals[3] / elapsed,
                    "train/padding_fraction": 1 - totals[3] / totals[4],
                    "train/samples_seen": samples_seen,
                }
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                log.log(step, record)
                progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}")
                loss_sum.zero_()
                micro_batches = samples = real_tokens = padded_tokens = 0
                tic = time.perf_counter()

            if isinstance(t.eval_every, int) and step % t.eval_every == 0:
                metrics = _evaluate_and_log(model, eval_dl, accelerator, cfg, log, step)
                last_eval_step = step
            if step >= total_steps:
                break
        if t.eval_every == "epoch" and last_eval_step != step:
            metrics = _evaluate_and_log(model, eval_dl, accelerator, cfg, log, step)
            last_eval_step = step
        if step >= total_steps:
            break
    progress.close()
    if last_eval_step != step:
        metrics = _evaluate_and_log(model, eval_dl, accelerator, cfg, log, step)

    save_model(accelerator, model, tokenizer, out / "final")
    if accelerator.is_main_process:
        (out / "final" / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.close()
    accelerator.print(f"saved {out / 'final'}")
    accelerator.print(json.dumps(metrics))
    accelerator.end_training()
    return metrics


def _evaluate_and_log(model, eval_dl, accelerator, cfg: Config, log: MetricsLog, step: int) -> dict:
    metrics = evaluate(model, eval_dl, accelerator, cfg.model.num_labels)
    log.log(step, {f"eval/{k}": v for k, v in metrics.items()})
    accelerator.print(f"step {step}: " + ", ".join(f"eval {k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics
