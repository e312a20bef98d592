"""The run's arithmetic, written once: global batch, steps, warmup, eval/save cadence, training FLOPs.

    s = Schedule.of(cfg.train, num_examples=25_000, world_size=16)
    s.global_batch, s.steps_per_epoch, s.total_steps, s.warmup      # 128, 196, 588, 500

Used by the batch sampler, the trainer, `harness plan` and the DeepSpeed config filling, so the numbers a
plan prints are the numbers a run uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.config import TrainConfig
from harness.errors import BadInput


def global_batch(per_device: int, grad_accum: int, world_size: int) -> int:
    """Examples per optimizer step, all ranks together."""
    return per_device * grad_accum * world_size


def steps_in_epoch(num_examples: int, batch: int, position: int = 0) -> int:
    """Optimizer steps that consume an epoch's examples from sample `position` on (the last one may be short)."""
    return math.ceil(max(num_examples - position, 0) / batch)


def warmup_steps_for(cfg: TrainConfig, total_steps: int) -> int:
    """Warmup in optimizer steps; refuses a warmup longer than the run."""
    w = cfg.warmup_steps
    steps = int(round(w * total_steps)) if 0 < w < 1 else int(w)
    if steps > total_steps:
        raise BadInput(f"train.warmup_steps={steps} is longer than the run ({total_steps} optimizer steps)")
    return steps


def eval_batch_size(cfg: TrainConfig) -> int:
    """Per-process evaluation batch: train.eval_batch_size, else twice the training batch (no gradients kept)."""
    return cfg.eval_batch_size or 2 * cfg.per_device_batch_size


@dataclass(frozen=True)
class Schedule:
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int

    @classmethod
    def of(cls, t: TrainConfig, num_examples: int, world_size: int, step: int = 0, epoch: int = 0,
           position: int = 0) -> "Schedule":
        """The schedule of a run from (step, epoch, position): a fresh run starts at zero; a resumed one
        continues an epoch from the sample it reached, possibly on another world size."""
        batch = global_batch(t.per_device_batch_size, t.grad_accum_steps, world_size)
        if num_examples < batch:
            raise BadInput(f"global batch {batch} (per-device {t.per_device_batch_size} x accumulation "
                           f"{t.grad_accum_steps} x {world_size} processes) is larger than the training set ({num_examples})")
        per_epoch = steps_in_epoch(num_examples, batch)
        total = t.max_steps or step + steps_in_epoch(num_examples, batch, position) + (t.epochs - epoch - 1) * per_epoch
        return cls(batch, per_epoch, total, warmup_steps_for(t, total))

    def check_cadence(self, t: TrainConfig) -> None:
        """Refuse an eval or save interval that would never come during the run."""
        if isinstance(t.save_every, int) and t.save_every > self.total_steps:
            raise BadInput(f"train.save_every={t.save_every} is longer than the run ({self.total_steps} optimizer steps): no checkpoint would be written")
        if isinstance(t.eval_every, int) and t.eval_every > self.total_steps:
            raise BadInput(f"train.eval_every={t.eval_every} is longer than the run ({self.total_steps} optimizer steps)")


def training_flops_per_token(non_embedding_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per real token: 6 x non-embedding parameters (forward and backward matmuls) plus
    12 x layers x hidden x sequence length (attention scores and their use, forward and backward)."""
    return 6 * non_embedding_params + 12 * layers * hidden * seq_len


def flops_upper_bound(per_token_at_max_length: float, total_steps: int, batch: int, max_length: int) -> float:
    """Every example of every step at max_length: what the run cannot exceed."""
    return per_token_at_max_length * total_steps * batch * max_length
