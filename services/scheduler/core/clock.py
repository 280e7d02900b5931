"""Where the core gets "now": virtual in the simulator, monotonic in the service.

The core never reads the wall clock itself: the service passes its
``MonotonicClock`` (``services/scheduler/service/clock.py``) and the simulator
a :class:`VirtualClock`.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class VirtualClock:
    """Time that moves only when the simulator says so (never backwards)."""

    __slots__ = ("t",)

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        if t < self.t:
            raise ValueError(f"virtual time cannot go back from {self.t} to {t}")
        self.t = t
