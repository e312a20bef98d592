"""Build, once per machine, the DeepSpeed C++ ops that the CPU tests load: part of setting up the tests.

    python -m tests.deepspeed_ops        # about 2 minutes on 2 cores the first time; 1-2 s when already built

The README installs DeepSpeed without prebuilt ops (`DS_BUILD_OPS=0`), so DeepSpeed compiles an op just in time,
into ~/.cache/torch_extensions, the first time a process needs it. On CPU ranks two are needed:
- `deepspeed_shm_comm` (DeepSpeed's shared-memory collectives for CPU ranks, built when a process group starts);
- `cpu_adam` (the optimizer of the shipped ZeRO-3 CPU-offload launch config).
Left to the tests, these builds ran inside the first tests that start DeepSpeed, took both cores from the other
pytest worker for about two minutes, and made the suite's time depend on whether this machine had built them
before. Here they are built the same way (DeepSpeed's own loader, for the accelerator the tests see), before the
tests start.
"""

from __future__ import annotations

import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def main() -> int:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            print(f"{name}: not used by DeepSpeed on this {accelerator.device_name()} machine", flush=True)
            continue
        tic = time.perf_counter()
        builder.load(verbose=False)
        print(f"{builder.absolute_name()}: ready in {time.perf_counter() - tic:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
