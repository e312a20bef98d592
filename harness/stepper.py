"""One optimizer step of training: its micro-batches through forward, loss, backward, clipping and the optimizer,
eagerly or replayed as CUDA graphs, with the run's dropout and attention-mask choices and the non-finite guard."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from harness.attention import attention_mask_for, mask_format
from harness.config import Config, TrainConfig
from harness.data import model_inputs
from harness.dropout import FastCpuDropout
from harness.families import family_of, mask_setting
from harness.graphs import StepGraphs, backend_for
from harness.tasks import Task, mean_by_document
from harness.tracking import SyncWatch, compile_report


def fast_dropout(t: TrainConfig, device: torch.device) -> bool:
    """train.cpu_dropout=fast applies: torch's dropout on CPUs draws one Bernoulli number per element, harness's
    in bulk; compiled graphs and GPU kernels draw their own, and a checkpointed layer recomputes its forward outside
    the step's dropout mode (its masks must be torch's, drawn again from the restored RNG state)."""
    return t.cpu_dropout == "fast" and device.type == "cpu" and not t.compile and not t.gradient_checkpointing


class Stepper:
    """`stepper.step(micro_batches, step)` runs optimizer step `step` (1-based); `grad_norm` is the newest clipped
    norm, `lr()` the learning rate the step used. Nothing here waits for the GPU."""

    def __init__(self, cfg: Config, task: Task, accelerator, model, optimizer, scheduler, guard, meter,
                 sharded: Optional[str], say):
        t = cfg.train
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.guard, self.meter, self.max_grad_norm, self.compiled = guard, meter, t.max_grad_norm, t.compile
        self.task, self.per_document = task, t.chunk_loss == "documents"
        self.compile_records_graphs = t.compile_records_graphs
        self.watch = SyncWatch(t.sync_debug)
        # what was loaded (sdpa falls back to eager where unsupported), read off the model inside any wrapper
        self.attn = accelerator.unwrap_model(model).config._attn_implementation
        device = accelerator.device
        self.dropout_mode = FastCpuDropout() if fast_dropout(t, device) else contextlib.nullcontext()
        family = family_of(accelerator.unwrap_model(model).config)
        new_graph = backend_for(cfg, device, accelerator.num_processes, sharded, self.attn,
                                mask_setting(cfg.model.attention_mask, family), say)
        self.graphs = None if new_graph is None else StepGraphs(
            self.micro_step, optimizer, device, new_graph, self._reset, say, quiet=self.watch.paused)
        # layers compiled apart and captured steps need the same mask for every batch (no host check inside)
        layers_compiled = t.compile and t.compile_scope == "layers"
        self.mask = mask_format(cfg.model.attention_mask, family, device, layers_compiled or self.graphs is not None)
        self.current, self.grad_norm = 0, None

    def step(self, micro_batches: list[dict], step: int) -> None:
        self.current = step
        with self.watch:
            for batch in micro_batches:
                self.meter.count(batch)  # on the host, before the copy: logging needs no device synchronisation
                batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
                batch["attention_mask"] = attention_mask_for(batch["attention_mask"], self.attn, self.mask)
                with self.accelerator.accumulate(self.model):
                    loss, norm = (self.graphs or self.micro_step)(batch)
                self.grad_norm = self.grad_norm if norm is None else norm
                self.meter.add_loss(loss)  # the loss (and norm) of a replayed graph hold until its next replay
                self.guard.observe(step, loss, self.grad_norm if self.accelerator.sync_gradients else None)
            assert self.accelerator.sync_gradients, "a step's last micro-batch synchronises the gradients"
            self.scheduler.step()

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward, loss, backward, clipping and the optimizer for one micro-batch: what train.cuda_graphs captures."""
        with self.dropout_mode:
            logits = self.model(**model_inputs(batch)).logits
        labels = batch["labels"]
        if self.per_document:  # train.chunk_loss=documents: one loss per text, on the mean of its windows' logits
            logits, first = mean_by_document(logits, batch["doc"])
            labels = labels[first]
        # in fp32 whatever the weights' dtype (autocast computes it so; bf16 weights would give a bf16 loss)
        loss = self.guard.inject(self.task.loss(logits, labels, weighted=True), self.current)
        self.accelerator.backward(loss)
        norm = None
        if self.accelerator.sync_gradients and self.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])  # a tensor on the device under train.cuda_graphs

    def _reset(self) -> None:  # the gradients a failed capture may have left (the fp32 masters' and the model's)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def reports(self) -> list[str]:
        """What the run's end says about its steps: host syncs, CUDA graphs, compilation."""
        lines = [self.watch.report()] if self.watch.report() else []
        if self.graphs is not None:
            lines.append(self.graphs.report())
        if self.compiled:
            lines.append(compile_report(cuda_graphs=self.compile_records_graphs))
        return lines
