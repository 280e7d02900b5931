"""Batching modes, as in the SSJF paper.

- ``none``: one job per worker at a time (a worker's extra slots stay idle).
- ``dynamic``: an idle worker takes up to ``max_batch`` jobs at once, or fewer
  once the first of them has waited ``wait_s``; the batch runs to its end and
  its slots free together.
- ``continuous``: each of a worker's K slots takes the next job the moment it
  frees (iteration-level scheduling).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BatchingMode(enum.Enum):
    NONE = "none"
    DYNAMIC = "dynamic"
    CONTINUOUS = "continuous"


@dataclass(frozen=True)
class Batching:
    mode: BatchingMode = BatchingMode.CONTINUOUS
    max_batch: int = 8  # dynamic: B; continuous: cap on a worker's advertised slots
    wait_s: float = 0.05  # dynamic: T

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        if self.wait_s < 0:
            raise ValueError(f"batch wait must be >= 0 seconds, got {self.wait_s}")

    @classmethod
    def parse(cls, mode: str, max_batch: int = 8, wait_s: float = 0.05) -> Batching:
        try:
            m = BatchingMode(mode)
        except ValueError:
            names = ", ".join(x.value for x in BatchingMode)
            raise ValueError(f"unknown batching mode {mode!r}; choose one of {names}") from None
        return cls(m, max_batch, wait_s)

    def usable_slots(self, worker_slots: int) -> int:
        """Slots of a worker this mode uses at once."""
        if self.mode is BatchingMode.NONE:
            return 1
        return max(1, min(worker_slots, self.max_batch))
