"""The training loop, top to bottom: `train` holds the run, `build` sets it up in named steps, `fit` loops.

    harness train --config configs/quickstart.yaml                        # one process (CPU or one GPU)
    accelerate launch --config_file launch_configs/accelerate/multi_gpu.yaml \\
        -m harness train --config configs/bert_base_imdb.yaml train.max_steps=200

Every rank runs every line: evaluation, saving and the stop decision are collective, and only the few places
that write files check for the main process. Each component owns its rule and cadence: the Stepper (one
optimizer step), the StepLogger (log_every), the Evaluator (eval_every, best/, early stopping) and the
Checkpointer (save_every, keep_last); the RunContext owns everything that must be let go on the way out.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from harness.attention import make_unpadded
from harness.checkpoint import Checkpointer, Progress, latest_checkpoint, read_progress
from harness.config import Config
from harness.data import INDEX, StepBatchSampler, size, training_data
from harness.distributed import (build_accelerator, collective_timeout, configure_deepspeed,
                                 configure_fsdp, device_name, record_deepspeed_config, sharding)
from harness.errors import TrainingDiverged, WriteFailed
from harness.evaluation import Evaluator
from harness.export import Exporter, copy_model
from harness.faults import Faults
from harness.graphs import check_config as check_graphs_config
from harness.guards import NonFiniteGuard, StallWatchdog, StopFlag
from harness.families import pad_token
from harness.modeling import (check_model, compile_model, enable_gradient_checkpointing, flops_per_token, load_model,
                              load_tokenizer, peak_flops)
from harness.optim import build_optimizer, lr_schedule
from harness.precision import MasterWeights, bf16_master_weights, precision_in_words
from harness.resume import Resume
from harness.run_folder import RunFolder
from harness.schedule import Schedule
from harness.stepper import Stepper, fast_dropout
from harness.tasks import Task, class_weights
from harness.tracking import DtypeProbe, MetricsLog, StepLogger, Throughput, trackers


def train(cfg: Config) -> dict:
    """One run in its folder: the folder's lock is held from before anything is written until the end."""
    with RunContext(cfg) as ctx:
        parts = build(cfg, ctx)
        return fit(parts, ctx) if parts is not None else {}


class RunContext:
    """What a run holds and must let go on every way out (the end, a stop signal, an error): the run folder's
    lock, the stall watchdog, the stop flag, the metrics log and trackers, and the Accelerator's end_training."""

    def __init__(self, cfg: Config):
        t = cfg.train
        self.run, self.faults = RunFolder(t.output_dir), Faults.from_env()
        self.master_weights = bf16_master_weights(t.bf16_mode)
        self.accelerator = build_accelerator(t.grad_accum_steps, trackers(t.report_to), str(self.run.tensorboard),
                                             t.stall_timeout_s, autocast=not self.master_weights)
        self.say = functools.partial(self.accelerator.print, flush=True)  # once per job, not per node
        self.timeout_s = t.stall_timeout_s
        self.lock = self.watchdog = self.stop = self.log = self.parts = None

    def __enter__(self) -> "RunContext":
        self.lock = self.run.hold(self.accelerator, warn=self.say)  # a second run into this folder: exit 2
        self.watchdog = StallWatchdog(self.timeout_s, self.accelerator.process_index, on_stall=self.run.record_stop,
                                      faults=self.faults)
        return self

    def install_stop_flag(self) -> StopFlag:
        self.stop = StopFlag().install(self.accelerator, collective_timeout(self.timeout_s))
        return self.stop

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if self.parts is not None:
                self._end_loop(self.parts)
            if isinstance(error, (TrainingDiverged, WriteFailed)) and self.accelerator.is_main_process:
                self.run.record_stop(str(error))
        finally:
            self.watchdog.stop()
            self.lock.release()
        return False

    def _end_loop(self, parts: "Parts") -> None:
        if self.accelerator.is_main_process:
            self.run.record_launch(event="ended", step=parts.state.step, samples_seen=parts.state.samples_seen)
        parts.logger.close()
        for line in parts.stepper.reports():
            self.say(line)
        self.log.close()
        self.stop.uninstall()
        self.accelerator.end_training()


@dataclass
class Parts:
    """A built run: where it stands, its data and its components."""

    cfg: Config
    state: Progress
    total_steps: int
    epoch_size: int
    sampler: StepBatchSampler
    loader: DataLoader
    stepper: Stepper
    logger: StepLogger
    evaluator: Evaluator
    checkpointer: Checkpointer
    exporter: Exporter
    guard: NonFiniteGuard


# ---------------------------------------------------------------- setup


def build(cfg: Config, ctx: RunContext) -> Optional[Parts]:
    """Data, model, optimizer and schedule, `prepare`, resume, components; None when the run is finished already."""
    acc, run, t = ctx.accelerator, ctx.run, cfg.train
    check_graphs_config(cfg)
    start, checkpoint = run.decide(cfg, warn=ctx.say)
    if start == "finished":
        ctx.say(f"{run.root} already holds a finished run of this config ({run.final}); nothing to do")
        return None
    acc.wait_for_everyone()  # every rank has looked at output_dir before the main process writes there
    if acc.is_main_process:
        run.begin(cfg, fresh=start == "fresh")
    set_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    padding = pad_token(tokenizer, cfg.model.pad_token)
    if padding:
        ctx.say(padding)
    check_model(cfg.model, cfg.data.max_length, tokenizer)  # before the tokenizing; the weights load after it
    train_ds, eval_ds, sampler, train_dl, eval_dl = training_data(cfg, tokenizer, acc)
    state, schedule = position(cfg, checkpoint, sampler, sampler.epoch_size, acc.num_processes)
    model, optimizer, scheduler, masters, probe, model_flops = build_model(cfg, ctx, schedule, tokenizer.pad_token_id)
    resume = Resume(acc, checkpoint, state, t.seed, masters is not None) if checkpoint else None
    if resume:
        resume.before_prepare(model, optimizer)
    model, optimizer, scheduler, eval_dl = acc.prepare(model, optimizer, scheduler, eval_dl)
    record_deepspeed_config(acc, run.deepspeed_config)
    if resume:
        rng = resume.after_prepare(model, optimizer, scheduler)
        ctx.say(f"resumed from {checkpoint} ({resume.mode}): step {state.step}, epoch {state.epoch}, "
                f"{state.position} of {sampler.epoch_size} {'texts' if sampler.units else 'examples'} of the epoch done")
        ctx.say(rng)
    ctx.log = MetricsLog(acc, run, cfg, resume_step=state.step if checkpoint else None)
    guard = NonFiniteGuard(acc, functools.partial(latest_checkpoint, run.root), ctx.faults)
    meter = Throughput(acc, model_flops, peak_flops(t.peak_flops))
    launch = announce(cfg, ctx, state, schedule, sampler, (size(train_ds), size(eval_ds)), masters is not None)
    task = Task.of(cfg.model)
    if t.class_weights is not None:
        task.class_weights = class_weights(train_ds["labels"], cfg.model.num_labels, t.class_weights)
        ctx.say(f"class weights ({t.class_weights}): {[round(w, 4) for w in task.class_weights.tolist()]}")
    stepper = Stepper(cfg, task, acc, model, optimizer, scheduler, guard, meter, sharding(acc), ctx.say)
    exporter = Exporter(acc, model, tokenizer, masters, cfg, launch, ctx.watchdog, ctx.faults)
    ctx.install_stop_flag()
    ctx.parts = Parts(
        cfg, state, schedule.total_steps, sampler.epoch_size, sampler, train_dl, stepper,
        StepLogger(acc, ctx.log, meter, probe, t.log_every, schedule.total_steps, sampler.epoch_size, guard, ctx.say),
        Evaluator(t, task, acc, model, eval_dl, ctx.log, exporter, run.best, guard, ctx.watchdog, ctx.say),
        Checkpointer(acc, run.root, t.save_every, t.keep_last, sampler.global_batch, sharding(acc), guard, ctx.watchdog,
                     ctx.say, ctx.faults),
        exporter, guard)
    return ctx.parts


def position(cfg: Config, checkpoint, sampler: StepBatchSampler, epoch_size: int, world_size: int):
    """Where the run starts (a checkpoint's progress, or zero) and its schedule in optimizer steps for this
    world size and accumulation."""
    state = read_progress(checkpoint) if checkpoint else Progress()
    if state.position >= epoch_size:
        state.next_epoch()
    sampler.set_epoch(state.epoch, state.position)
    return state, Schedule.of(cfg.train, epoch_size, world_size, state.step, state.epoch, state.position)


def build_model(cfg: Config, ctx: RunContext, schedule: Schedule, pad_token_id: int):
    """(model, optimizer, scheduler, master weights or None, dtype probe, FLOPs per token), before `prepare`."""
    t, acc = cfg.train, ctx.accelerator
    model = load_model(cfg.model, warn=ctx.say, pad_token_id=pad_token_id)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.model.unpadded:
        make_unpadded(model)  # before any wrapper: Accelerate's autocast wraps this forward
    model_flops = flops_per_token(model)  # read off the bare model, before any wrapper
    probe = DtypeProbe(model, compiled=t.compile)
    if ctx.master_weights:  # on the device before the optimizer takes its parameters as the fp32 masters
        model.to(acc.device)
    # fused AdamW: one kernel per step on GPUs, and far faster than the per-parameter loop on CPUs
    optimizer = build_optimizer(model, t.lr, t.weight_decay, fused=acc.state.deepspeed_plugin is None,
                                layer_decay=t.layer_lr_decay)
    masters = MasterWeights(model, optimizer) if ctx.master_weights else None
    if t.compile:
        ctx.say(f"torch.compile ({t.compile_mode}): {compile_model(model, t.compile_mode, t.compile_scope)}")
    scheduler = lr_schedule(optimizer, schedule.warmup, schedule.total_steps, t.lr_schedule)
    configure_deepspeed(acc, t)
    configure_fsdp(acc, model)
    return model, optimizer, scheduler, masters, probe, model_flops


def announce(cfg: Config, ctx: RunContext, state: Progress, schedule: Schedule, sampler: StepBatchSampler,
             sizes: tuple[str, str], master_weights: bool) -> dict:
    """The run's start, said once and written to launches.jsonl: parallelism, precision, sizes and steps; returns
    the launch in words (processes, parallelism, precision) for the model card."""
    acc, t = ctx.accelerator, cfg.train
    parallelism = sharding(acc) or ("DDP" if acc.num_processes > 1 else "one process")
    precision = precision_in_words(acc.mixed_precision, master_weights)
    dropout = ", dropout drawn by harness (train.cpu_dropout=fast)" if fast_dropout(t, acc.device) else ""
    ctx.say(f"parallelism: {parallelism} on {acc.device.type}, mixed precision {precision}{dropout}")
    if acc.is_main_process:
        ctx.run.record_launch(event="started", step=state.step, processes=acc.num_processes,
                              device=device_name(acc.device), mixed_precision=precision, parallelism=parallelism,
                              torch=torch.__version__)
    ctx.say(f"train: {sizes[0]}, eval: {sizes[1]}; {acc.num_processes} process(es) x "
            f"batch {t.per_device_batch_size} x accumulation {t.grad_accum_steps} = {sampler.global_batch} per step; "
            f"{schedule.steps_per_epoch} steps/epoch, {schedule.total_steps} steps, warmup {schedule.warmup}")
    return {"processes": acc.num_processes, "parallelism": parallelism, "precision": precision}


# ---------------------------------------------------------------- the loop


def optimizer_steps(loader: DataLoader, grad_accum: int) -> Iterator[list[dict]]:
    """The loader's micro-batches, one optimizer step's together (StepBatchSampler gives every step all of them)."""
    batches = iter(loader)
    while group := list(itertools.islice(batches, grad_accum)):
        yield group


def record_examples(accelerator, log: MetricsLog, step: int, micro_batches: list[dict]) -> None:
    """train.record_examples, collective: the step's example indices in its global order (micro-batch a of rank r
    is the step's (a * world_size + r)-th part, as StepBatchSampler cuts it) as `train/examples`."""
    mine = [[int(i) for i in batch[INDEX]] for batch in micro_batches]
    everyone = gather_object([mine])  # one entry per rank, in rank order
    log.log(step, {"train/examples": [i for a in range(len(mine)) for rank in everyone for i in rank[a]]})


def fit(p: Parts, ctx: RunContext) -> dict:
    state, t = p.state, p.cfg.train
    p.stepper.model.train()
    p.logger.start(state.step)
    ctx.watchdog.start()  # from here, no progress for train.stall_timeout_s ends the rank (exit 4)
    while state.step < p.total_steps and not p.evaluator.stop_early(state):
        for micro_batches in optimizer_steps(p.loader, t.grad_accum_steps):
            p.stepper.step(micro_batches, state.step + 1)
            if t.record_examples:
                record_examples(p.stepper.accelerator, ctx.log, state.step + 1, micro_batches)
            stopping = ctx.stop.should_stop()  # every rank at every step: a collective
            state.advance(p.sampler.global_batch, p.epoch_size)
            ctx.watchdog.beat(state.step)
            p.logger.after_step(state, p.stepper.lr(), p.stepper.grad_norm)
            p.evaluator.maybe_run(state)
            if p.evaluator.stop_early(state):
                break
            if stopping:
                path = p.checkpointer.save(state)
                ctx.say(f"stopped by a signal at step {state.step}; resumable checkpoint: {path}")
                return p.evaluator.metrics
            p.checkpointer.maybe_save(state)
            if state.step >= p.total_steps:
                break
        else:  # the epoch ran to its end
            p.evaluator.maybe_run(state, epoch_ended=True)
            if p.evaluator.stop_early(state):
                break
            state.next_epoch()
            p.sampler.set_epoch(state.epoch)
            if state.step < p.total_steps:
                p.checkpointer.maybe_save(state, epoch_ended=True)
    return finish(p, ctx)


def finish(p: Parts, ctx: RunContext) -> dict:
    """The last evaluation and final/: the model as it ends, or (early stopping) a copy of best/."""
    state, t, run = p.state, p.cfg.train, ctx.run
    metrics = p.evaluator.final(state)
    p.guard.check()
    ctx.watchdog.beat()
    if p.evaluator.stop_early(state):
        note = {"early_stopping": {"stopped_at_step": state.step, "best_step": state.best_step, "metric": t.best_metric,
                                   "patience": t.early_stopping_patience, "min_delta": t.early_stopping_min_delta,
                                   "final_holds": f"the best model (step {state.best_step}), copied from best/"}}
        copy_model(ctx.accelerator, run.best, run.final, note)
        ctx.say(f"early stopping at step {state.step}: eval {t.best_metric} did not improve by more than "
                f"{t.early_stopping_min_delta:g} in {t.early_stopping_patience} evaluations; {run.final} holds the "
                f"best model, from step {state.best_step} ({t.best_metric} {state.best_value:.4f})")
        metrics = json.loads((run.final / "eval_results.json").read_text())
    else:
        p.exporter.export(run.final, metrics)
    ctx.say(f"saved {run.final}")
    ctx.say(json.dumps(metrics))
    return metrics
