"""The training loop, top to bottom.

    harness train --config configs/quickstart.yaml                        # one process (CPU or one GPU)
    accelerate launch --config_file launch_configs/accelerate/multi_gpu.yaml \\
        -m harness train --config configs/bert_base_imdb.yaml train.max_steps=200

Every rank runs every line of `train`: evaluation, saving and the stop decision are collective, and
only the few places that write files check for the main process.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harness.checkpoint import Progress, clear_run, plan_start, read_progress, save_checkpoint, save_model
from harness.config import BEST_METRICS, Config, warmup_steps_for
from harness.data import Collator, StepBatchSampler, build_split
from harness.distributed import StopFlag, build_accelerator, configure_deepspeed, deepspeed_requested
from harness.errors import BadInput, first_line
from harness.evaluation import eval_dataloader, evaluate
from harness.modeling import build_optimizer, flops_per_token, linear_schedule, load_model, load_tokenizer, peak_flops


class MetricsLog:
    """`metrics.jsonl` and TensorBoard, written by the main process only (one event file per run)."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        """A resumed run drops records past its checkpoint (they will be redone); a fresh run's folder was
        already emptied by `clear_run`."""
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step is not None else None)

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
    accelerator = build_accelerator(t.grad_accum_steps)

    def say(message: str) -> None:  # once per job, not once per node
        if accelerator.is_main_process:
            print(message, flush=True)

    start, checkpoint = plan_start(cfg, warn=say)
    if start == "finished":
        say(f"{out} already holds a finished run of this config ({out / 'final'}); nothing to do")
        return {}
    accelerator.wait_for_everyone()  # every rank has looked at output_dir before the main process writes there
    if accelerator.is_main_process:
        if start == "fresh":
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    set_seed(t.seed)

    # Data: each node's first process tokenizes and fills the datasets cache, the others read it.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    with accelerator.local_main_process_first():
        train_ds = build_split(d, d.train_split, tokenizer, d.train_samples, t.seed, cfg.model.label_names, cfg.model.num_labels)
        eval_ds = build_split(d, d.eval_split, tokenizer, d.eval_samples, t.seed, cfg.model.label_names, cfg.model.num_labels)
    # Compiled graphs are specialised to shapes: pad to multiples of 64 so at most max_length/64 are built.
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, 64 if t.compile else 8)
    sampler = StepBatchSampler(
        train_ds["length"], t.per_device_batch_size, t.grad_accum_steps,
        accelerator.num_processes, accelerator.process_index, t.seed, d.group_by_length,
    )
    # Not passed to prepare(): the sampler already gives each rank its own batches. The loaders get their
    # own generators so that starting one never draws from the global RNG (dropout) stream: resumed
    # runs then see exactly the random numbers of an uninterrupted one.
    train_dl = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=d.num_workers,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator())
    eval_dl = eval_dataloader(eval_ds, t.eval_batch_size or 2 * t.per_device_batch_size, collate, d.num_workers)

    # Where to start, and the schedule in optimizer steps for this world size and accumulation.
    state = read_progress(checkpoint) if checkpoint else Progress()
    if state.position >= len(train_ds):
        state.epoch, state.position = state.epoch + 1, 0
    steps_per_epoch = sampler.steps()
    sampler.set_epoch(state.epoch, state.position)
    total_steps = t.max_steps or state.step + sampler.steps() + (t.epochs - state.epoch - 1) * steps_per_epoch
    warmup = warmup_steps_for(t, total_steps)

    model = load_model(cfg.model)
    model_flops = flops_per_token(model)
    device_peak = peak_flops(t.peak_flops)
    optimizer = build_optimizer(model, t.lr, t.weight_decay,
                                fused=accelerator.device.type == "cuda" and accelerator.state.deepspeed_plugin is None)
    if t.compile:
        model = torch.compile(model)  # static first, then one dynamic-length graph: few recompiles
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    configure_deepspeed(accelerator, t)
    model, optimizer, scheduler, eval_dl = accelerator.prepare(model, optimizer, scheduler, eval_dl)
    if accelerator.state.deepspeed_plugin is not None and accelerator.is_main_process:
        resolved = json.dumps(accelerator.deepspeed_config, indent=2, default=str)
        (out / "deepspeed_config.json").write_text(resolved + "\n")
        print(f"DeepSpeed config (resolved, also in {out / 'deepspeed_config.json'}):\n{resolved}", flush=True)
    if checkpoint:
        check_world_size_change(state, accelerator)
        load_state(accelerator, checkpoint)
        say(f"resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, "
            f"{state.position} of {len(train_ds)} examples of the epoch done")

    log = MetricsLog(out, accelerator.is_main_process, resume_step=state.step if checkpoint else None)
    say(
        f"train: {len(train_ds)} examples, eval: {len(eval_ds)}; {accelerator.num_processes} process(es) x "
        f"batch {t.per_device_batch_size} x accumulation {t.grad_accum_steps} = {sampler.global_batch} per step; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup}"
    )

    def save(progress: Progress) -> Path:
        progress.world_size, progress.global_batch = accelerator.num_processes, sampler.global_batch
        tic = time.perf_counter()
        path = save_checkpoint(accelerator, out, progress, t.keep_last)
        say(f"checkpoint {path} written in {time.perf_counter() - tic:.2f} s")
        return path

    def evaluate_and_keep_best(step: int) -> dict:
        metrics = evaluate(model, eval_dl, accelerator, cfg.model.num_labels)
        log.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        say(f"step {step}: " + ", ".join(
            f"eval {k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if t.best_metric is not None:
            value, higher = metrics[t.best_metric], BEST_METRICS[t.best_metric]
            if state.best_value is None or (value > state.best_value if higher else value < state.best_value):
                state.best_value = value
                save_model(accelerator, model, tokenizer, out / "best", extra={"step": step, **metrics})
        return metrics

    stop = StopFlag().install()
    step, last_eval_step, metrics = state.step, -1, {}
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    loss_sum = torch.zeros((), device=accelerator.device)
    micro_batches = samples = real_tokens = padded_tokens = 0
    grad_norm = None
    tic = time.perf_counter()
    model.train()
    while step < total_steps:
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
            state.step = step
            state.position = min(state.position + sampler.global_batch, len(train_ds))
            progress.update(1)

            if step % t.log_every == 0 or step == total_steps:
                counts = torch.tensor([micro_batches, samples, real_tokens, padded_tokens], dtype=torch.float32)
                totals = accelerator.reduce(torch.cat([loss_sum.float().reshape(1), counts.to(accelerator.device)]), "sum").tolist()
                elapsed = time.perf_counter() - tic
                state.samples_seen += int(totals[2])
                record = {
                    "train/loss": totals[0] / totals[1],
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": state.epoch + state.position / len(train_ds),
                    "train/samples_per_s": totals[2] / elapsed,
                    "train/tokens_per_s": totals[3] / elapsed,
                    "train/padding_fraction": 1 - totals[3] / totals[4],
                    "train/samples_seen": state.samples_seen,
                    "train/peak_mem_mb": peak_memory_mb(accelerator.device),
                }
                if device_peak:  # model FLOPs utilisation on real (non-padding) tokens
                    seq_len = totals[4] / totals[2]
                    record["train/mfu"] = model_flops(seq_len) * record["train/tokens_per_s"] / (device_peak * accelerator.num_processes)
                if grad_norm is not None:
                    record["train/grad_norm"] = float(grad_norm)
                log.log(step, record)
                progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}")
                loss_sum.zero_()
                micro_batches = samples = real_tokens = padded_tokens = 0
                tic = time.perf_counter()

            if isinstance(t.eval_every, int) and step % t.eval_every == 0:
                metrics = evaluate_and_keep_best(step)
                last_eval_step = step
            if stop.should_stop(accelerator):
                path = save(state)
                say(f"stopped by a signal at step {step}; resumable checkpoint: {path}")
                progress.close()
                log.close()
                stop.uninstall()
                return metrics
            if isinstance(t.save_every, int) and step % t.save_every == 0:
                save(state)
            if step >= total_steps:
                break
        else:  # the epoch ran to its end
            if t.eval_every == "epoch" and last_eval_step != step:
                metrics = evaluate_and_keep_best(step)
                last_eval_step = step
            state.epoch, state.position = state.epoch + 1, 0
            sampler.set_epoch(state.epoch)
            if t.save_every == "epoch" and step < total_steps:
                save(state)
    progress.close()
    if last_eval_step != step:
        metrics = evaluate_and_keep_best(step)

    save_model(accelerator, model, tokenizer, out / "final", extra=metrics)
    log.close()
    stop.uninstall()
    say(f"saved {out / 'final'}")
    say(json.dumps(metrics))
    accelerator.end_training()
    return metrics


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_world_size_change(state: Progress, accelerator) -> None:
    """DDP resumes on any world size (the data position is a sample count); ZeRO's partitioned state does not."""
    if state.world_size != accelerator.num_processes and deepspeed_requested():
        raise BadInput(
            f"checkpoint was written by {state.world_size} processes and DeepSpeed ZeRO state is partitioned per "
            f"rank; resume it on {state.world_size} processes (now {accelerator.num_processes})"
        )


def load_state(accelerator, checkpoint: Path) -> None:
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # a file that passed the size check but does not parse
        raise BadInput(f"checkpoint {checkpoint} cannot be loaded: {first_line(e)}") from None
