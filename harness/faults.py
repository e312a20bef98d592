"""Fault injection for tests, read from the environment once per run and handed to the parts it breaks.

    HARNESS_FAULT_STALL_STEP=N [HARNESS_FAULT_STALL_RANK=R]          that rank hangs after step N
    HARNESS_FAULT_NONFINITE_STEP=N [HARNESS_FAULT_NONFINITE_RANK=R]  step N's loss becomes NaN (every rank by default)
    HARNESS_FAULT_WRITE=POINT[@N] [HARNESS_FAULT_WRITE_RANK=R]       a write raises ENOSPC at POINT (mkdir, state,
                                                                     progress, complete, rename, model) on rank R (0)

Nothing else in harness reads these variables: production code asks a `Faults` object, which is empty unless a
test set them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Mapping, Optional


def _int(value: Optional[str]) -> Optional[int]:
    return int(value) if value else None


@dataclass(frozen=True)
class Faults:
    stall_step: Optional[int] = None
    stall_rank: Optional[int] = None
    nonfinite_step: Optional[int] = None
    nonfinite_rank: Optional[int] = None
    write_point: Optional[str] = None
    write_step: Optional[int] = None
    write_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Faults":
        point, _, at = (env.get("HARNESS_FAULT_WRITE") or "").partition("@")
        return cls(_int(env.get("HARNESS_FAULT_STALL_STEP")), _int(env.get("HARNESS_FAULT_STALL_RANK")),
                   _int(env.get("HARNESS_FAULT_NONFINITE_STEP")), _int(env.get("HARNESS_FAULT_NONFINITE_RANK")),
                   point or None, _int(at), _int(env.get("HARNESS_FAULT_WRITE_RANK")) or 0)

    def stalls(self, rank: int, step: int) -> bool:
        return self.stall_step == step and self.stall_rank in (None, rank)

    def poisons(self, rank: int, step: int) -> bool:
        return self.nonfinite_step == step and self.nonfinite_rank in (None, rank)

    def write(self, point: str, rank: int, step: Optional[int] = None) -> None:
        """Raise a full disk's error at this point of a write, where asked."""
        if self.write_point == point and rank == self.write_rank and self.write_step in (None, step):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at '{point}')")


NONE = Faults()
