"""`train.cuda_graphs`: whole training steps captured as CUDA graphs, one per batch shape, and replayed.

At a small batch a GPU step is bound by the host: the eager model dispatches thousands of operators a step,
each costing microseconds of Python, dispatch and a kernel launch. A CUDA graph
records the kernels of one whole step (forward, loss, backward, clipping, the optimizer) once and replays
them with one launch; nothing is compiled, so capturing costs about one step per shape. With train.compile
(compile_mode default or max-autotune-no-cudagraphs) the graph holds the compiled model's kernels, fused and fewer:
the model is compiled in the uncaptured steps before the first capture (one dynamic graph for every shape), so a
capture runs compiled code only.

What a replay does is fixed at capture, so:
- every batch shape gets its own graph (data.pad_multiple=auto bounds them: 8 padded lengths at max_length
  512), captured after the shape ran `warmup` eager steps (cuBLAS and attention plans, the optimizer's state);
  a shape seen fewer times (an epoch's last, shorter batch) or past `limit` graphs runs eagerly;
- each batch is copied into the graph's own input tensors, and the loss and gradient norm it returns are the
  graph's output tensors, overwritten by the next replay (the loop reads them before that);
- the learning rate becomes a tensor on the device, which the scheduler fills in place (a float would be
  replayed as it was at capture);
- nothing in the step may wait for the GPU: harness's loop has no such wait (the GPU suite counts them), and a
  capture that fails all the same (for this or any other reason) leaves that shape eager, with the reason printed.

Whatever a step does in Python besides launching kernels (hooks, the fault injection of tests) runs at
capture only. The graphs share one memory pool: only their loss and gradient norm outlive a replay.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable, Optional

import torch

from harness.config import Config, ModelConfig, TrainConfig
from harness.errors import BadInput, first_line

Step = Callable[[dict], tuple]  # batch -> (loss, grad_norm or None)


class CudaGraph:
    """One captured step on the current CUDA device; graphs of a run share `pool`."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self):
        # thread_local, as torch.compile's CUDA graphs: only this thread's unsafe calls fail the capture, not the data
        # loader's pin-memory thread (data.num_workers > 0, as the shipped recipes) allocating pinned memory meanwhile
        return torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local")

    def replay(self) -> None:
        self.graph.replay()


def config_clash(m: ModelConfig, t: TrainConfig) -> Optional[str]:
    """What in the config keeps its steps from being captured as CUDA graphs (train.cuda_graphs), or None:
    `true` refuses it, `auto` runs eagerly. The launch (processes, engine, device) is checked at the start."""
    if t.compile_records_graphs:
        return (f"train.compile_mode={t.compile_mode}, which records CUDA graphs of its own (a capture cannot "
                f"hold another): use compile_mode default or max-autotune-no-cudagraphs")
    if t.grad_accum_steps > 1:
        return "train.grad_accum_steps above 1 (a graph replays a whole optimizer step)"
    if m.unpadded:
        return "model.unpadded (the packed length changes with every batch)"
    if t.chunk_loss == "documents":
        return "train.chunk_loss=documents (a batch's number of windows changes with its texts)"
    return None


def check_config(cfg: Config) -> None:
    """train.cuda_graphs=true with a config that rules graphs out: refused before anything runs (train, plan)."""
    clash = config_clash(cfg.model, cfg.train)
    if cfg.train.cuda_graphs is True and clash:
        raise BadInput(f"train.cuda_graphs does not go with {clash}")


def launch_clash(num_processes: int, sharded: Optional[str], attn: str, mask_setting: str) -> Optional[tuple[str, str]]:
    """What in the launch keeps steps from being captured: (why, the refusal of `true`), or None."""
    if num_processes > 1 or sharded:
        return (f"{sharded or f'{num_processes} processes'}: graphs of whole steps are for one process without "
                f"DeepSpeed or FSDP",
                "train.cuda_graphs runs one process without DeepSpeed or FSDP: launch it with "
                "launch_configs/accelerate/single_gpu.yaml (or none)")
    if attn != "sdpa" or mask_setting == "2d":  # transformers' mask check reads the GPU
        return (f"{attn} attention with model.attention_mask={mask_setting}: graphs need SDPA with a 4D mask",
                f"train.cuda_graphs needs SDPA attention with a 4D mask (model.attention_mask auto or 4d); "
                f"this model runs {attn} attention with model.attention_mask={mask_setting}")
    return None


def backend_for(cfg: Config, device: torch.device, num_processes: int, sharded: Optional[str], attn: str, mask: str,
                say) -> Callable[[], object] | None:
    """train.cuda_graphs decided for this run: a factory of graphs, or None for eager steps; `mask` is
    model.attention_mask as this model's family takes it (families.mask_setting). `true` refuses (exit 2)
    a launch where graphs cannot be; `auto` runs eagerly there, saying why on a GPU, and silently on CPUs."""
    t = cfg.train
    if t.cuda_graphs is False:
        return None
    launch = launch_clash(num_processes, sharded, attn, mask)
    if launch and t.cuda_graphs is True:
        raise BadInput(launch[1])
    new_graph = graph_backend(device)
    if new_graph is None:
        if t.cuda_graphs is True:
            say(f"train.cuda_graphs: no CUDA device ({device.type}), the steps run eagerly")
        return None
    if t.cuda_graphs == "auto":  # what `true` would have refused, and a whole compiled model (not run on a GPU)
        why = (launch and launch[0]) or config_clash(cfg.model, t) or (
            "train.compile_scope=model: captures of a whole compiled model have not run on a GPU; "
            "train.cuda_graphs=true asks for them" if t.compile and t.compile_scope == "model" else None)
        if why:
            say(f"train.cuda_graphs=auto: the steps run eagerly ({why})")
            return None
    return new_graph


def graph_backend(device: torch.device) -> Callable[[], object] | None:
    """A factory of empty graphs for `device`; None where CUDA graphs do not exist (the steps then run eagerly)."""
    if device.type != "cuda":
        return None
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)


class StepGraphs:
    """Runs `step(batch)`: eagerly for a shape's first `warmup` batches, then as that shape's captured graph.

    A capture that fails (an operator that cannot be captured) leaves that shape eager, said once through `say`;
    `reset` then clears the gradients the failed capture may have left. Captures run inside `quiet()` (the loop's
    sync counter paused: a capture synchronises by design, once per shape; replays do not)."""

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer, device: torch.device,
                 new_graph: Callable[[], object], reset: Callable[[], None], say: Callable[[str], None] = print,
                 warmup: int = 2, limit: int = 16,
                 quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.step, self.optimizer, self.device, self.new_graph = step, optimizer, device, new_graph
        self.reset, self.say, self.warmup, self.limit, self.quiet = reset, say, warmup, limit, quiet
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.graphs: dict[tuple, tuple] = {}  # shape key -> (graph, its input tensors, its output tensors)
        self.failed: dict[tuple, str] = {}  # shape key -> why its capture failed
        self.seen: collections.Counter = collections.Counter()
        self.eager_steps = self.replays = 0
        self.capture_s = 0.0
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

    def __call__(self, batch: dict) -> tuple:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in batch.items())
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.seen[key] > self.warmup and key not in self.failed and len(self.graphs) < self.limit:
                entry = self._capture(key, batch)
            if entry is None:
                self.eager_steps += 1
                with self._side_stream():
                    return self.step(batch)
        graph, inputs, outputs = entry
        for name, value in batch.items():
            inputs[name].copy_(value, non_blocking=True)
        graph.replay()
        self.replays += 1
        return outputs

    def _capture(self, key: tuple, batch: dict) -> tuple | None:
        inputs = {name: value.clone() for name, value in batch.items()}
        graph = self.new_graph()
        tic = time.perf_counter()
        self._capturable(True)
        try:
            with self.quiet(), graph.capture():  # records the kernels without running them: the replay runs this batch
                outputs = self.step(inputs)
        except Exception as e:  # noqa: BLE001 - whatever the reason, this shape trains eagerly
            self.reset()
            self.failed[key] = first_line(e)
            shape = ", ".join(f"{name} {tuple(value.shape)}" for name, value in batch.items())
            self.say(f"train.cuda_graphs: the step of batches of shape {shape} could not be captured "
                     f"({self.failed[key]}); they run eagerly")
            return None
        finally:
            self._capturable(False)
            self.capture_s += time.perf_counter() - tic
        self.graphs[key] = graph, inputs, outputs
        return self.graphs[key]

    def _capturable(self, on: bool) -> None:
        """torch refuses to capture an optimizer step unless its groups say `capturable` (fused AdamW keeps its step
        counts on the device either way); off between captures, where torch would warn about it on every eager step."""
        for group in self.optimizer.param_groups:
            group["capturable"] = on

    @contextlib.contextmanager
    def _side_stream(self):
        """Eager steps on a side stream, as torch's CUDA-graph notes ask of the warm-up before a capture."""
        if self.side is None:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.side)

    def report(self) -> str:
        failed = f", {len(self.failed)} shape(s) failed to capture" if self.failed else ""
        return (f"CUDA graphs: {len(self.graphs)} captured (one per batch shape) in {self.capture_s:.2f} s{failed}, "
                f"{self.replays} step(s) replayed, {self.eager_steps} run eagerly (a shape's first {self.warmup}, "
                f"or past {self.limit} graphs)")
