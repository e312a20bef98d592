"""The training loop, top to bottom.

    harness train --config configs/quickstart.yaml                        # one process (CPU or one GPU)
    accelerate launch --config_file launch_configs/accelerate/multi_gpu.yaml \\
        -m harness train --config configs/bert_base_imdb.yaml train.max_steps=200

Every rank runs every line of `train`: evaluation, saving and the stop decision are collective, and
only the few places that write files check for the main process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from harness.checkpoint import Progress, copy_model, latest_checkpoint, read_progress, save_checkpoint, save_model
from harness.config import BEST_METRICS, Config, cuda_graph_clash
from harness.data import training_data
from harness.distributed import (StallWatchdog, StopFlag, bf16_master_weights, build_accelerator, check_world_size,
                                 collective_timeout, configure_deepspeed, configure_fsdp, record_deepspeed_config, sharding)
from harness.errors import BadInput, TrainingDiverged, WriteFailed, first_line
from harness.evaluation import evaluate
from harness.graphs import StepGraphs, graph_backend
from harness.modeling import (FastCpuDropout, MasterWeights, attention_mask_for, build_optimizer, check_max_length,
                              check_weight_files, compile_model, flops_per_token, linear_schedule, load_model,
                              load_model_config, load_tokenizer, make_unpadded, peak_flops)
from harness.run_folder import RunFolder, hold_run_folder
from harness.schedule import Schedule
from harness.tracking import DtypeProbe, MetricsLog, NonFiniteGuard, SyncWatch, Throughput, compile_report, trackers


def train(cfg: Config) -> dict:
    """One run in its folder: the folder's lock is held from before anything is written until the end."""
    t = cfg.train
    run = RunFolder(t.output_dir)
    master_weights = bf16_master_weights(t.bf16_mode)
    accelerator = build_accelerator(t.grad_accum_steps, trackers(t.report_to), str(run.tensorboard), t.stall_timeout_s,
                                    autocast=not master_weights)
    say = functools.partial(accelerator.print, flush=True)  # the main process only: once per job, not per node
    lock = hold_run_folder(run, accelerator, warn=say)  # a second run into this folder is refused (exit 2)
    watchdog = StallWatchdog(t.stall_timeout_s, accelerator.process_index, on_stall=run.record_stop)
    try:
        return train_in(run, cfg, accelerator, watchdog, master_weights)
    except (TrainingDiverged, WriteFailed) as e:
        if accelerator.is_main_process:
            run.record_stop(str(e))
        raise
    finally:
        watchdog.stop()
        lock.release()


def train_in(run: RunFolder, cfg: Config, accelerator, watchdog: StallWatchdog, master_weights: bool = False) -> dict:
    t = cfg.train
    say = functools.partial(accelerator.print, flush=True)

    start, checkpoint = run.decide(cfg, warn=say)
    if start == "finished":
        say(f"{run.root} already holds a finished run of this config ({run.final}); nothing to do")
        return {}
    accelerator.wait_for_everyone()  # every rank has looked at output_dir before the main process writes there
    if accelerator.is_main_process:
        run.begin(cfg, fresh=start == "fresh")
    set_seed(t.seed)

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    # what the model's files say against the config, before the tokenizing (the weights load after it)
    check_max_length(cfg.data.max_length, load_model_config(cfg.model), tokenizer)
    check_weight_files(cfg.model)
    train_ds, eval_ds, sampler, train_dl, eval_dl = training_data(cfg, tokenizer, accelerator)

    # Where to start, and the schedule in optimizer steps for this world size and accumulation.
    state = read_progress(checkpoint) if checkpoint else Progress()
    if state.position >= len(train_ds):
        state.epoch, state.position = state.epoch + 1, 0
    sampler.set_epoch(state.epoch, state.position)
    schedule = Schedule.of(t, len(train_ds), accelerator.num_processes, state.step, state.epoch, state.position)
    total_steps = schedule.total_steps

    model = load_model(cfg.model)
    if cfg.model.unpadded:
        make_unpadded(model)  # before any wrapper: Accelerate's autocast wraps this forward
    model_flops = flops_per_token(model)  # read off the bare model, before any wrapper
    attn = model.config._attn_implementation  # what was loaded (sdpa falls back to eager where unsupported)
    probe = DtypeProbe(model, compiled=t.compile)
    if master_weights:  # on the device before the optimizer takes its parameters as the fp32 masters
        model.to(accelerator.device)
    # fused AdamW: one kernel per step on GPUs; on CPUs 8x faster than the per-parameter loop (MiniLM: 15 against 117 ms)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, fused=accelerator.state.deepspeed_plugin is None)
    # train.bf16_mode=master_weights: the model gets bf16 copies, the optimizer steps the fp32 originals
    masters = MasterWeights(model, optimizer) if master_weights else None
    layers_compiled = t.compile and t.compile_scope == "layers"
    if t.compile:
        say(f"torch.compile ({t.compile_mode}): {compile_model(model, t.compile_mode, t.compile_scope)}")
    scheduler = linear_schedule(optimizer, schedule.warmup, total_steps)
    configure_deepspeed(accelerator, t)
    configure_fsdp(accelerator, model)
    model, optimizer, scheduler, eval_dl = accelerator.prepare(model, optimizer, scheduler, eval_dl)
    record_deepspeed_config(accelerator, run.deepspeed_config)
    if checkpoint:
        check_world_size(state.world_size, state.sharding, accelerator)
        load_state(accelerator, checkpoint, optimizer)
        say(f"resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, "
            f"{state.position} of {len(train_ds)} examples of the epoch done")

    log = MetricsLog(accelerator, run, cfg, resume_step=state.step if checkpoint else None)
    parallelism = sharding(accelerator) or ('DDP' if accelerator.num_processes > 1 else 'one process')
    precision = "bf16 weights, fp32 master weights" if masters else accelerator.mixed_precision
    fast_dropout = t.cpu_dropout == "fast" and accelerator.device.type == "cpu" and not t.compile
    say(f"parallelism: {parallelism} on {accelerator.device.type}, mixed precision {precision}"
        + (", dropout drawn by harness (train.cpu_dropout=fast)" if fast_dropout else ""))
    if accelerator.is_main_process:
        run.record_session(event="started", step=state.step, processes=accelerator.num_processes,
                           device=device_name(accelerator.device), mixed_precision=precision,
                           parallelism=parallelism, torch=torch.__version__)
    say(
        f"train: {len(train_ds)} examples, eval: {len(eval_ds)}; {accelerator.num_processes} process(es) x "
        f"batch {t.per_device_batch_size} x accumulation {t.grad_accum_steps} = {sampler.global_batch} per step; "
        f"{schedule.steps_per_epoch} steps/epoch, {total_steps} steps, warmup {schedule.warmup}"
    )

    def export_weights() -> dict | None:  # what final/ and best/ hold: the fp32 masters where the model computes in bf16
        return masters.state_dict(accelerator.unwrap_model(model, keep_torch_compile=False)) if masters else None

    def save(progress: Progress) -> Path:
        guard.check(newest_good)  # never a checkpoint of poisoned weights
        progress.world_size, progress.global_batch = accelerator.num_processes, sampler.global_batch
        progress.sharding = sharding(accelerator)
        tic = time.perf_counter()
        watchdog.beat()
        path = save_checkpoint(accelerator, run.root, progress, t.keep_last)
        watchdog.beat()
        say(f"checkpoint {path} written in {time.perf_counter() - tic:.2f} s")
        return path

    def evaluate_and_keep_best(step: int) -> dict:
        guard.check(newest_good)
        # a compiled model evaluates eagerly: a second (no-grad) graph per padded length would cost compile time
        # (and CUDA-graph memory) for batches at which the GPU is busy anyway
        with torch.compiler.set_stance("force_eager" if t.compile else "default"):
            metrics = evaluate(model, eval_dl, accelerator, cfg.model.num_labels, on_batch=watchdog.beat)
        log.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        say(f"step {step}: " + ", ".join(
            f"eval {k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if t.best_metric is not None:  # the metrics are the same on every rank: so is every decision here
            value, higher = metrics[t.best_metric], BEST_METRICS[t.best_metric]
            gain = None if state.best_value is None else (value - state.best_value if higher else state.best_value - value)
            if gain is None or gain > 0:
                state.best_value, state.best_step = value, step
                watchdog.beat()
                save_model(accelerator, model, tokenizer, weights=export_weights, path=run.best, extra={"step": step, **metrics},
                           training_config=cfg.to_yaml())
                watchdog.beat()
            if gain is None or gain > t.early_stopping_min_delta:
                state.evals_without_improvement = 0
            else:
                state.evals_without_improvement += 1
        return metrics

    def early_stop_due() -> bool:
        return bool(t.early_stopping_patience) and state.evals_without_improvement >= t.early_stopping_patience

    stop = StopFlag().install(accelerator, collective_timeout(t.stall_timeout_s))
    meter = Throughput(accelerator, model_flops, peak_flops(t.peak_flops))
    watch = SyncWatch(t.sync_debug)
    # train.cpu_dropout=fast: torch's dropout on CPUs draws one Bernoulli number per element (30% of a MiniLM step)
    dropout_mode = FastCpuDropout() if fast_dropout else contextlib.nullcontext()
    guard = NonFiniteGuard(accelerator)

    def training_step(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward, loss, backward, clipping and the optimizer for one micro-batch: what train.cuda_graphs captures."""
        with dropout_mode:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # in fp32 whatever the weights' dtype (autocast computes it so; bf16 weights would give a bf16 loss)
        loss = guard.inject(torch.nn.functional.cross_entropy(logits.float(), batch["labels"]), step + 1)
        accelerator.backward(loss)
        norm = None
        if accelerator.sync_gradients and t.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, norm

    graphs = step_graphs(accelerator, model, training_step, optimizer, attn, cfg, say, watch)
    newest_good = functools.partial(latest_checkpoint, run.root, warn=lambda message: None)
    step, last_eval_step, metrics = state.step, -1, {}
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    grad_norm = None
    model.train()
    first_tic = time.perf_counter()  # the first step apart: compilation, kernel plans and allocation happen there
    watchdog.start()  # from here, no progress for train.stall_timeout_s ends the rank (exit 4)
    try:
        while step < total_steps and not early_stop_due():
            for batch in train_dl:
                meter.count(batch)  # on the host, before the copy: logging needs no device synchronisation
                with watch:
                    batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                    batch["attention_mask"] = attention_mask_for(batch["attention_mask"], attn, cfg.model.attention_mask,
                                                                 no_host_check=layers_compiled or graphs is not None)
                    with accelerator.accumulate(model):
                        loss, norm = (graphs or training_step)(batch)
                    grad_norm = grad_norm if norm is None else norm
                    meter.add_loss(loss)  # the loss (and norm) of a replayed graph hold until its next replay
                    guard.observe(step + 1, loss, grad_norm if accelerator.sync_gradients else None)
                    if accelerator.sync_gradients:
                        scheduler.step()
                        stopping = stop.should_stop()
                if probe is not None:  # what the launch config's precision really gave the forward
                    say(f"compute dtype {probe.remove()} (the classifier layer's output)")
                    probe = None
                if not accelerator.sync_gradients:
                    continue
                step += 1
                watchdog.beat(step)
                if first_tic is not None:
                    if accelerator.device.type == "cuda":
                        torch.cuda.synchronize()  # once, outside the steady state
                    say(f"first step in {time.perf_counter() - first_tic:.2f} s (compilation, plans and allocation included)")
                    first_tic = None
                # the step consumed the next global batch of the epoch (fewer at its end), all ranks together
                state.samples_seen += min(sampler.global_batch, len(train_ds) - state.position)
                state.step, state.position = step, min(state.position + sampler.global_batch, len(train_ds))
                progress.update(1)

                if step % t.log_every == 0 or step == total_steps:
                    guard.check(newest_good)
                    record = meter.read()
                    # the learning rate is a tensor on the device with train.cuda_graphs
                    record.update({"train/lr": float(scheduler.get_last_lr()[0]), "train/samples_seen": state.samples_seen,
                                   "train/epoch": state.epoch + state.position / len(train_ds)})
                    if grad_norm is not None:
                        record["train/grad_norm"] = float(grad_norm)
                    log.log(step, record)
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}")
                if isinstance(t.eval_every, int) and step % t.eval_every == 0:
                    metrics, last_eval_step = evaluate_and_keep_best(step), step
                    if early_stop_due():
                        break
                if stopping:
                    path = save(state)
                    say(f"stopped by a signal at step {step}; resumable checkpoint: {path}")
                    return metrics
                if isinstance(t.save_every, int) and step % t.save_every == 0:
                    save(state)
                if step >= total_steps:
                    break
            else:  # the epoch ran to its end
                if t.eval_every == "epoch" and last_eval_step != step:
                    metrics, last_eval_step = evaluate_and_keep_best(step), step
                    if early_stop_due():
                        break
                state.epoch, state.position = state.epoch + 1, 0
                sampler.set_epoch(state.epoch)
                if t.save_every == "epoch" and step < total_steps:
                    save(state)
        if last_eval_step != step:
            metrics = evaluate_and_keep_best(step)
        guard.check(newest_good)
        watchdog.beat()
        if early_stop_due():
            note = {"early_stopping": {"stopped_at_step": step, "best_step": state.best_step, "metric": t.best_metric,
                                       "patience": t.early_stopping_patience, "min_delta": t.early_stopping_min_delta,
                                       "final_holds": f"the best model (step {state.best_step}), copied from best/"}}
            copy_model(accelerator, run.best, run.final, note)
            say(f"early stopping at step {step}: eval {t.best_metric} did not improve by more than "
                f"{t.early_stopping_min_delta:g} in {t.early_stopping_patience} evaluations; {run.final} holds the best "
                f"model, from step {state.best_step} ({t.best_metric} {state.best_value:.4f})")
            metrics = json.loads((run.final / "eval_results.json").read_text())
        else:
            save_model(accelerator, model, tokenizer, weights=export_weights, path=run.final, extra=metrics, training_config=cfg.to_yaml())
        say(f"saved {run.final}")
        say(json.dumps(metrics))
        return metrics
    finally:  # every way out: the stop path, the end, and an error
        if accelerator.is_main_process:
            run.record_session(event="ended", step=step, samples_seen=state.samples_seen)
        progress.close()
        if watch.report():
            say(watch.report())
        if graphs is not None:
            say(graphs.report())
        if t.compile:
            say(compile_report(cuda_graphs=t.compile_records_graphs))
        log.close()
        stop.uninstall()
        accelerator.end_training()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{device.type} ({platform.processor() or platform.machine()})"


def step_graphs(accelerator, model, training_step, optimizer, attn: str, cfg: Config, say,
                watch: SyncWatch) -> StepGraphs | None:
    """train.cuda_graphs: the steps as CUDA graphs where that is possible. `true` refuses (exit 2) a launch
    where it cannot be; `auto` runs eagerly there, saying why on a GPU, and silently on CPUs."""
    t = cfg.train
    if t.cuda_graphs is False:
        return None
    launch = None  # (why, the refusal of `true`)
    if accelerator.num_processes > 1 or sharding(accelerator):
        launch = (f"{sharding(accelerator) or f'{accelerator.num_processes} processes'}: graphs of whole steps are "
                  f"for one process without DeepSpeed or FSDP",
                  "train.cuda_graphs runs one process without DeepSpeed or FSDP: launch it with "
                  "launch_configs/accelerate/single_gpu.yaml (or none)")
    elif attn != "sdpa" or cfg.model.attention_mask == "2d":  # transformers' mask check reads the GPU
        launch = (f"{attn} attention with model.attention_mask={cfg.model.attention_mask}: graphs need SDPA with a 4D mask",
                  f"train.cuda_graphs needs SDPA attention with a 4D mask (model.attention_mask auto or 4d); "
                  f"this model runs {attn} attention with model.attention_mask={cfg.model.attention_mask}")
    if launch and t.cuda_graphs is True:
        raise BadInput(launch[1])
    new_graph = graph_backend(accelerator.device)
    if new_graph is None:
        if t.cuda_graphs is True:
            say(f"train.cuda_graphs: no CUDA device ({accelerator.device.type}), the steps run eagerly")
        return None
    if t.cuda_graphs == "auto":  # what `true` would have refused, and a whole compiled model (not run on a GPU)
        why = (launch and launch[0]) or cuda_graph_clash(cfg.model, t) or (
            "train.compile_scope=model: captures of a whole compiled model have not run on a GPU; "
            "train.cuda_graphs=true asks for them" if t.compile and t.compile_scope == "model" else None)
        if why:
            say(f"train.cuda_graphs=auto: the steps run eagerly ({why})")
            return None

    def reset() -> None:  # the gradients a failed capture may have left (the fp32 masters' and the model's)
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)

    return StepGraphs(training_step, optimizer, accelerator.device, new_graph, reset, say, quiet=watch.paused)


def load_state(accelerator, checkpoint: Path, optimizer) -> None:
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # a file that passed the size check but does not parse
        raise BadInput(f"checkpoint {checkpoint} cannot be loaded: {first_line(e)}") from None
    for group in optimizer.param_groups:  # a train.cuda_graphs run saved it as a tensor (StepGraphs makes it one again)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])
