"""The service's clock: the only place the scheduler reads time for the core."""

from __future__ import annotations

import time


class MonotonicClock:
    """Wall-clock independent seconds; immune to NTP steps."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()
