"""The Accelerator that `accelerate launch` asked for (CPU ranks over gloo, DDP, DeepSpeed ZeRO, FSDP2), its engines
configured from the recipe.

The launch config alone decides the hardware; the code path is the same everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from harness.config import TrainConfig
from harness.errors import BadInput
from harness.schedule import global_batch


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this in every process it starts."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config sets this in every process it starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def collective_timeout(stall_timeout_s: Optional[float]) -> Optional[timedelta]:
    """The process group's collective timeout: a minute beyond the stall watchdog's bound, so that the watchdog
    (which prints every thread's stack) fires first; torch's default (10 or 30 minutes) when it is off."""
    return timedelta(seconds=stall_timeout_s + 60) if stall_timeout_s else None


def build_accelerator(grad_accum_steps: int = 1, log_with: list[str] | None = None,
                      logging_dir: str | None = None, stall_timeout_s: Optional[float] = None,
                      autocast: bool = True) -> Accelerator:
    """The Accelerator for what the launcher asked; `log_with` trackers write under `logging_dir`;
    `autocast=False`: none of the launch config's autocast (bf16 weights compute in bf16 by themselves)."""
    if deepspeed_requested() and importlib.util.find_spec("deepspeed") is None:
        raise BadInput("the launch config asks for DeepSpeed, which is not installed: pip install -e '.[deepspeed]'")
    if deepspeed_requested() and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
        read_deepspeed_json(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])  # Accelerate reads it next, with a traceback
    kwargs: dict = {}
    group: dict = {"timeout": collective_timeout(stall_timeout_s)}
    if not torch.cuda.is_available():
        # DeepSpeed, which Accelerate imports on the way wherever it is installed, would warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if deepspeed_requested() or fsdp_requested():
            # cpu=True would drop the DeepSpeed/FSDP plugin; without an explicit backend Accelerate records one
            # process while DeepSpeed sees the whole world, and DeepSpeed then refuses the batch arithmetic.
            group["backend"] = "gloo"
        else:
            # A MULTI_GPU launch config on a machine without GPUs still starts N ranks; cpu=True makes them gloo.
            kwargs["cpu"] = True
    kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    if not autocast:
        kwargs["mixed_precision"] = "no"
    if log_with:
        kwargs["log_with"] = log_with
        kwargs["project_dir"] = logging_dir
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum_steps,
        # The schedule is sized in optimizer steps and stepped once per step, never once per process.
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    if fsdp_requested() and not torch.cuda.is_available() and accelerator.num_processes > 1:
        _fsdp_on_cpu_ranks(accelerator)
    return accelerator


def _fsdp_on_cpu_ranks(accelerator: Accelerator) -> None:
    """Accelerate enables FSDP only for GPU-like devices; torch's FSDP2 itself runs on gloo CPU ranks.

    On a machine without GPUs (CI, a laptop) an FSDP launch config would otherwise train N unsynchronised
    copies of the model. Here the shared state is switched to FSDP with the plugin the launcher described,
    so `prepare` shards the model with `fully_shard` exactly as on GPUs, and collectives run over gloo.
    """
    plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* variables
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def describe_zero(zero_optimization: dict) -> str:
    """A DeepSpeed JSON's `zero_optimization` block in words: `DeepSpeed ZeRO-3 (offload: optimizer, param)`."""
    offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param")
               if (zero_optimization.get(k) or {}).get("device") not in (None, "none")]
    return f"DeepSpeed ZeRO-{zero_optimization.get('stage', 0)}" + (f" (offload: {', '.join(offload)})" if offload else "")


def describe_fsdp(version, reshard_after_forward: bool, offload: bool) -> str:
    """An FSDP setting in words: `FSDP2 (full sharding, CPU offload)`."""
    kind = "full sharding" if reshard_after_forward else "gradient/optimizer sharding"
    return f"FSDP{version} ({kind}{', CPU offload' if offload else ''})"


def sharding(accelerator: Accelerator) -> str | None:
    """What the launch config shards, in words (None for DDP or one process): for logs and the world-size rule."""
    if accelerator.state.deepspeed_plugin is not None:
        config = accelerator.state.deepspeed_plugin.deepspeed_config  # before `prepare` too
        return describe_zero(config.get("zero_optimization") or {})
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and accelerator.distributed_type == DistributedType.FSDP:
        policy = plugin.cpu_offload  # FSDP2: CPUOffloadPolicy or a plain OffloadPolicy (no offload); FSDP1: CPUOffload
        offloaded = type(policy).__name__ == "CPUOffloadPolicy" or getattr(policy, "offload_params", False) is True
        return describe_fsdp(plugin.fsdp_version, bool(plugin.reshard_after_forward), offloaded)
    return None


def resume_family(sharding_words: str | None) -> str:
    """How a parallelism lays out its checkpoint: `DDP` (one process too: whole state, in Accelerate's files),
    `FSDP2` (torch.distributed.checkpoint folders), `ZeRO-1/2` or `ZeRO-3` (DeepSpeed's per-rank partitions)."""
    if sharding_words is None:
        return "DDP"
    if sharding_words.startswith("DeepSpeed"):
        return "ZeRO-3" if sharding_words.startswith("DeepSpeed ZeRO-3") else "ZeRO-1/2"
    return sharding_words.split()[0]


FAMILIES = ("DDP", "FSDP2", "ZeRO-1/2", "ZeRO-3")  # what harness.resume can read and write
UNIVERSAL = "through DeepSpeed's universal checkpoint"  # how ZeRO changes world size; harness.resume reads it


def _on(sharding_words: str | None, world_size: int) -> str:
    if sharding_words is None:
        return "one process" if world_size == 1 else f"DDP on {world_size} processes"
    return f"{sharding_words} on {world_size} processes"


def resume_mode(saved_world_size: int, saved_sharding: str | None, world_size: int, sharding_words: str | None) -> str:
    """What resuming a checkpoint written by `saved_world_size` processes under `saved_sharding` does on this
    launch, in words (harness.resume does it), or BadInput when it cannot be done:
    - the same layout and world size: `same world size`;
    - DDP on another world size: its state is whole, only the data position (a sample count) matters;
    - FSDP2 on another world size: torch.distributed.checkpoint reads the shards onto the new mesh;
    - DeepSpeed ZeRO on another world size: through DeepSpeed's universal checkpoint, converted once beside it;
    - between DDP (or one process), FSDP2, ZeRO-1/2 and ZeRO-3: through the consolidated training state;
    - anything else (FSDP1's layout): refused."""
    old, new = resume_family(saved_sharding), resume_family(sharding_words)
    if old == new and saved_world_size == world_size:
        return "same world size"
    if old == new and old in FAMILIES:  # ZeRO partitions go through DeepSpeed's universal layout
        how = "" if old in ("DDP", "FSDP2") else f" {UNIVERSAL}"
        return f"resharded from {saved_world_size} to {world_size} processes{how}"
    if old in FAMILIES and new in FAMILIES:
        return f"converted from {_on(saved_sharding, saved_world_size)} to {_on(sharding_words, world_size)}"
    raise BadInput(f"checkpoint was written by {saved_world_size} processes under {_on(saved_sharding, saved_world_size)}"
                   f"; harness resumes {old} state only under {old} on {saved_world_size} processes, not under "
                   f"{_on(sharding_words, world_size)}: resume it with the launch config that wrote it")


def read_deepspeed_json(path: str) -> dict:
    if not os.path.isfile(path):  # a launch config's deepspeed_config_file is read from the current directory
        where = "" if os.path.isabs(path) else (f" (relative to the current directory, {os.getcwd()}: "
                                                 "launch from the repository root)")
        raise BadInput(f"DeepSpeed config file not found: {path}{where}")
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
            global_batch(t.per_device_batch_size, t.grad_accum_steps, world_size),
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


def configure_fsdp(accelerator: Accelerator, model) -> None:
    """FSDP2 units: the model's `_no_split_modules` less the ones holding the input embeddings.

    Accelerate wraps the input embedding module as a unit of its own; a `_no_split_modules` entry that
    contains it (BertEmbeddings for BERT) would shard those parameters twice and fail. A launch config
    that names `fsdp_transformer_layer_cls_to_wrap` itself is left as it is.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)  # absent, not None, in some modes
    if plugin is None or getattr(plugin, "transformer_cls_names_to_wrap", None):
        return
    embeddings = model.get_input_embeddings()
    holders = {type(m).__name__ for m in model.modules() if any(sub is embeddings for sub in m.modules())}
    names = [n for n in (getattr(model, "_no_split_modules", None) or []) if n not in holders]
    if names:
        plugin.transformer_cls_names_to_wrap = names


def record_deepspeed_config(accelerator: Accelerator, path) -> None:
    """Under DeepSpeed, print the config as resolved (auto values filled) and write it to `path` (main process)."""
    if accelerator.state.deepspeed_plugin is None or not accelerator.is_main_process:
        return
    resolved = json.dumps(accelerator.deepspeed_config, indent=2, default=str)
    path.write_text(resolved + "\n")
    print(f"DeepSpeed config (resolved, also in {path}):\n{resolved}", flush=True)


def fill_deepspeed(config: dict, values: dict) -> dict:
    """Write dotted keys (`zero_optimization.stage`) into a DeepSpeed config dict, in place."""
    for dotted, value in values.items():
        section = config
        *parents, key = dotted.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
        section[key] = value
    return config


def device_name(device: torch.device) -> str:
    """The device in words, for launches.jsonl: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def failing_rank(accelerator, failed: bool) -> int:
    """Collective: the highest rank on which something failed, or -1 where it failed nowhere."""
    rank = accelerator.process_index if failed else -1
    if accelerator.num_processes > 1:
        flag = torch.tensor([rank], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        rank = int(flag.item())
    return rank
