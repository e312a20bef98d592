"""Building the Accelerator for whatever `accelerate launch` asked for: CPU (gloo), DDP, DeepSpeed.

The launch config alone decides the hardware; the code path is the same everywhere.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from harness.config import TrainConfig
from harness.errors import BadInput
from harness.schedule import global_batch


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this in every process it starts."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config sets this in every process it starts."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def bf16_master_weights(bf16_mode: str) -> bool:
    """Whether this run keeps bf16 weights with fp32 masters (train.bf16_mode=master_weights under a bf16
    launch config); refused, naming the reason, where the launch config's engine decides precision itself.
    `auto`: master weights on a GPU with one process or DDP (1.27x autocast's samples/s at batch 128 on an
    H100), autocast on CPUs (a wash there) and wherever DeepSpeed or FSDP decide precision."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "bf16":
        return False
    if bf16_mode == "auto":
        on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "false").lower() != "true"
        return on_gpu and not (deepspeed_requested() or fsdp_requested())
    if bf16_mode != "master_weights":
        return False
    if deepspeed_requested() or fsdp_requested():
        raise BadInput("train.bf16_mode=master_weights is for one process or DDP: with DeepSpeed or FSDP launch configs, "
                       "their own bf16 settings decide (DeepSpeed keeps fp32 master weights already)")
    return True


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
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

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
        return describe_zero(accelerator.deepspeed_config.get("zero_optimization") or {})
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and accelerator.distributed_type == DistributedType.FSDP:
        policy = plugin.cpu_offload  # FSDP2: CPUOffloadPolicy or a plain OffloadPolicy (no offload); FSDP1: CPUOffload
        offloaded = type(policy).__name__ == "CPUOffloadPolicy" or getattr(policy, "offload_params", False) is True
        return describe_fsdp(plugin.fsdp_version, bool(plugin.reshard_after_forward), offloaded)
    return None


def check_world_size(saved_world_size: int, saved_sharding: str | None, accelerator: Accelerator) -> None:
    """DDP resumes on any world size (the data position is a sample count); sharded state does not.

    ZeRO partitions and FSDP's sharded checkpoints hold one shard of the optimizer state per rank, and each
    rank's RNG state is saved under its rank: resuming them on another world size is refused, naming both.
    """
    what = saved_sharding or sharding(accelerator)
    if what is not None and saved_world_size != accelerator.num_processes:
        raise BadInput(
            f"checkpoint was written by {saved_world_size} processes and {what} state is sharded per rank; "
            f"resume it on {saved_world_size} processes (now {accelerator.num_processes})"
        )


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


class StopFlag:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption or the time limit) ask for a clean stop.

    The handler only records the request. `should_stop` is called by every rank at every optimizer-step
    boundary. With several processes it is a collective that never waits for the GPU: a MAX all-reduce of
    a CPU flag over a gloo group, started at one step and read at the next, so a signal that reached one
    rank stops all of them at the same step (one step after it arrived), and none waits forever in a
    collective the others skipped. A second signal changes nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        self._group = None
        self._pending = None  # (work, tensor) of the all-reduce started at the previous step

    def install(self, accelerator=None, timeout: Optional[timedelta] = None) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if accelerator is not None and accelerator.num_processes > 1:
            import torch.distributed as dist

            # every rank creates it (a collective); gloo keeps the flag on the CPU, away from CUDA streams
            self._group = dist.new_group(backend="gloo", timeout=timeout)
        return self

    def uninstall(self) -> None:
        if self._pending is not None:  # every rank started it: finish it so that no rank leaves one behind
            self._pending[0].wait()
            self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def should_stop(self) -> bool:
        local = self.received is not None
        if self._group is None:
            return local
        import torch.distributed as dist

        decided = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = bool(flag.item() > 0)  # a CPU tensor: no device synchronisation
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return decided


class StallWatchdog:
    """`train.stall_timeout_s`: a thread on every rank that ends a rank which stopped making progress.

    `beat()` marks progress: every optimizer step, every evaluation batch, and each rank's entry to and exit
    from a checkpoint or model write. When no beat came for the bound, the rank prints one line and the Python
    stacks of all its threads (faulthandler) to stderr, records the reason in the run folder and exits with
    status 4, so the launcher ends the job (a peer waiting in a collective trips its own watchdog the same way).
    The clock starts at the first step, after loading and `prepare`; until the first step is done the bound is
    tripled (a compiled model's first step compiles; cuDNN plans are built). Evaluations and checkpoint writes
    beat as they go, so only one evaluation batch or one write longer than the bound counts as a stall.
    """

    FIRST_STEP_FACTOR = 3
    EXIT_CODE = 4

    def __init__(self, timeout_s: Optional[float], rank: int, on_stall: Callable[[str], None] = lambda reason: None):
        self.timeout_s, self.rank, self.on_stall = timeout_s, rank, on_stall
        self.step, self.stepped = 0, False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        fault_step, fault_rank = os.environ.get("HARNESS_FAULT_STALL_STEP"), os.environ.get("HARNESS_FAULT_STALL_RANK")
        self._fault = int(fault_step) if fault_step and (fault_rank is None or int(fault_rank) == rank) else None

    def start(self) -> "StallWatchdog":
        if self.timeout_s:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="harness-stall-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: Optional[int] = None) -> None:
        self._last = time.monotonic()
        if step is not None:
            self.step, self.stepped = step, True
            if self._fault == step:  # fault injection for tests: this rank hangs after this step
                print(f"harness: fault injection: rank {self.rank} stalls after step {step}", file=sys.stderr, flush=True)
                time.sleep(3600)

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(5.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s * (1 if self.stepped else self.FIRST_STEP_FACTOR):
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        import tempfile

        reason = (f"rank {self.rank} made no training progress for {idle:.0f} s (train.stall_timeout_s="
                  f"{self.timeout_s:g}; last completed step {self.step}); stopped by the stall watchdog")
        try:
            with tempfile.TemporaryFile("w+") as f:  # faulthandler writes to a file descriptor, unbuffered
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                stacks = "".join(f"[rank {self.rank}] {line}" for line in f)  # ranks share stderr: label each line
            sys.stderr.write(f"harness: error: {reason}; the stacks of its threads follow\n{stacks}")
            sys.stderr.flush()
            self.on_stall(reason)
        finally:
            os._exit(self.EXIT_CODE)
