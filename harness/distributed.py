"""Building the Accelerator for whatever `accelerate launch` asked for: CPU (gloo), DDP, DeepSpeed.

The launch config alone decides the hardware; the code path is the same everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from harness.config import TrainConfig
from harness.errors import BadInput


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this in every process it starts."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(grad_accum_steps: int = 1) -> Accelerator:
    if deepspeed_requested() and importlib.util.find_spec("deepspeed") is None:
        raise BadInput("the launch config asks for DeepSpeed, which is not installed: pip install -e '.[deepspeed]'")
    kwargs: dict = {}
    if not torch.cuda.is_available():
        if deepspeed_requested():
            # cpu=True would drop the DeepSpeed plugin; without an explicit backend Accelerate records one
            # process while DeepSpeed sees the whole world (see ENVIRONMENT.md).
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            # A MULTI_GPU launch config on a machine without GPUs still starts N ranks; cpu=True makes them gloo.
            kwargs["cpu"] = True
    return Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        # The schedule is sized in optimizer steps and stepped once per step, never once per process.
        step_scheduler_with_optimizer=False,
        **kwargs,
    )


def read_deepspeed_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"DeepSpeed config {path}: cannot read it as JSON: {e}") from None


def deepspeed_values(written: dict, name: str, t: TrainConfig, world_size: int) -> dict:
    """The values the harness decides for DeepSpeed, checked against what the JSON states.

    The JSON is read as written: a value it states that contradicts the recipe is refused (naming both),
    never silently overridden. The harness builds the optimizer and schedule in every mode, so a JSON
    `optimizer` or `scheduler` block is refused too. DeepSpeed does the clipping (`gradient_clipping`).
    """
    for block in ("optimizer", "scheduler"):
        if block in written:
            raise BadInput(
                f"{name} defines its own '{block}'; harness builds AdamW and the linear schedule from train.* "
                f"(train.lr, train.weight_decay, train.warmup_steps): remove the '{block}' block"
            )
    wanted = {
        "train_micro_batch_size_per_gpu": (t.per_device_batch_size, "train.per_device_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum_steps, "train.grad_accum_steps"),
        "train_batch_size": (
            t.per_device_batch_size * t.grad_accum_steps * world_size,
            f"train.per_device_batch_size x train.grad_accum_steps x {world_size} processes",
        ),
        "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm"),
    }
    for key, (value, origin) in wanted.items():
        stated = written.get(key, "auto")
        if stated != "auto" and stated != value:
            raise BadInput(f"{name}: {key}={stated} contradicts {origin}={value}; set it to \"auto\" or make them agree")
    values = {key: value for key, (value, _) in wanted.items()}
    if (written.get("zero_optimization") or {}).get("stage") == 3:
        # the final export gathers the 16-bit weights on every rank; without this flag it cannot
        values["zero_optimization.stage3_gather_16bit_weights_on_model_save"] = True
    return values


def configure_deepspeed(accelerator: Accelerator, t: TrainConfig) -> None:
    """Fill DeepSpeed's `auto` values from the harness config, the one source of truth, before prepare()."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    written = read_deepspeed_json(source) if source != "none" else plugin.deepspeed_config
    name = source if source != "none" else "the DeepSpeed config of the launch config"
    fill_deepspeed(plugin.deepspeed_config, deepspeed_values(written, name, t, accelerator.num_processes))


def fill_deepspeed(config: dict, values: dict) -> dict:
    """Write dotted keys (`zero_optimization.stage`) into a DeepSpeed config dict, in place."""
    for dotted, value in values.items():
        section = config
        *parents, key = dotted.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
        section[key] = value
    return config


class StopFlag:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit) ask for a clean stop.

    The handler only records the request; `should_stop` is a collective (a max all-reduce) that every rank
    calls at each optimizer-step boundary, so a signal that reached one rank stops all of them at the same
    step, and none waits forever in a collective the others skipped. A second signal changes nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def should_stop(self, accelerator) -> bool:
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item() > 0)
