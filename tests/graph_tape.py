"""A CPU stand-in for a CUDA graph, so that CI can test what train.cuda_graphs relies on without a GPU.

A CUDA graph records the kernels a capture launches and replays exactly those kernels on the same memory:
Python does not run again, scalars are the ones seen at capture, inputs must be copied into the captured
tensors, and outputs are overwritten in place. `TapeGraph` does the same one level up: its capture records
every operator that reaches the kernels (forward, backward, optimizer) with the tensors it read and wrote,
and its replay re-runs that list on those tensors, writing each result into the tensor the capture produced.
Like a CUDA graph, the capture leaves no trace of its own: what it wrote into tensors that existed before is
restored, and the CPU generator is rewound, so the replay that follows runs that batch once. And like a CUDA
capture, a host synchronisation inside it (`.item()`, `bool(tensor)`) is an error.

What it cannot check: CUDA's own rules (memory pools, streams, which kernels may be captured); the GPU suite
runs the real graphs.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST_SYNCS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero"}  # .item() and bool(t) reach the first


def tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []  # (operator, args, kwargs, output, kind)
        self.undo: list[tuple] = []  # (tensor that existed before the capture, its value before a write)
        self.created: set[int] = set()  # storages made during the capture

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let torch.compile run its compiled code under the recorder, as it does inside a CUDA capture (under any
        other dispatch mode dynamo runs the model eagerly); the operators that code dispatches are recorded."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func.overloadpacket) in HOST_SYNCS:
            raise RuntimeError(f"{func.overloadpacket}: a host synchronisation inside a captured step")
        schema = func._schema
        bound = {**{a.name: v for a, v in zip(schema.arguments, args)}, **kwargs}
        written = [t for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
                   for t in tensors(bound.get(a.name))]
        for t in written:
            if t.untyped_storage().data_ptr() not in self.created:
                self.undo.append((t, t.detach().clone()))
        out = func(*args, **kwargs)
        if written:
            kind = "in place"  # replayed as it is: it writes into the recorded tensors
        elif any(r.alias_info is not None for r in schema.returns):
            kind = "view"  # metadata only: the recorded view already aliases the recorded tensor
        else:
            kind = "new"
            self.created.update(t.untyped_storage().data_ptr() for t in tensors(out))
        self.ops.append((func, args, kwargs, out, kind))
        return out


class TapeGraph:
    """capture() / replay(), as harness.graphs.CudaGraph."""

    def __init__(self):
        self.ops: list[tuple] = []

    @contextlib.contextmanager
    def capture(self):
        rng = torch.get_rng_state()
        recorder = _Recorder()
        try:
            with recorder:
                yield
        finally:  # a capture that failed has not run either
            with torch.no_grad():
                for t, before in reversed(recorder.undo):
                    t.copy_(before)
            torch.set_rng_state(rng)
        self.ops = recorder.ops

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out, kind in self.ops:
                if kind == "view":
                    continue
                result = func(*args, **kwargs)
                if kind == "new":
                    for recorded, fresh in zip(tensors(out), tensors(result)):
                        recorded.copy_(fresh)
