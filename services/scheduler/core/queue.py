"""The ready queue: one small interface, three implementations.

Removal is lazy everywhere: a removed job's entry is marked dead (its job slot
set to ``None``) and skipped when it surfaces, so cancel and pop both stay
O(log n) (vLLM rebuilds its heap on removal, O(n)). An entry is a list
``[key, seq, tick, job]`` (``tick`` is unique per push, so a requeued job's new
entry never ties with its dead one); ``job.entry`` points at it while queued.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from services.scheduler.core.clock import Clock
from services.scheduler.core.job import Job

KeyFn = Callable[[Job], float]

_ticks = itertools.count()


class ReadyQueue(Protocol):
    def push(self, job: Job) -> None: ...
    def pop(self) -> Job | None: ...
    def peek(self) -> Job | None: ...
    def remove(self, job: Job) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Job]: ...


def _take(entry: list[Any]) -> Job:
    job: Job = entry[3]
    entry[3] = None
    job.entry = None
    return job


class FifoQueue:
    """Arrival order (``job.seq``), whatever order predictions and requeues come in.

    Pushes are almost always the newest job (O(1) append); an older one (a late
    prediction, a requeued job) is inserted at its place, walking from the end.
    """

    def __init__(self) -> None:
        self._dq: deque[list[Any]] = deque()
        self._n = 0

    def push(self, job: Job) -> None:
        entry = [0.0, job.seq, next(_ticks), job]
        job.entry = entry
        self._n += 1
        dq = self._dq
        self._clean()
        if not dq or dq[-1][1] < job.seq:
            dq.append(entry)
            return
        if job.seq < dq[0][1]:
            dq.appendleft(entry)
            return
        pos = len(dq)
        while pos > 0 and dq[pos - 1][1] > job.seq:
            pos -= 1
        dq.insert(pos, entry)

    def _clean(self) -> None:
        dq = self._dq
        while dq and dq[0][3] is None:
            dq.popleft()

    def pop(self) -> Job | None:
        self._clean()
        if not self._dq:
            return None
        self._n -= 1
        return _take(self._dq.popleft())

    def peek(self) -> Job | None:
        self._clean()
        return self._dq[0][3] if self._dq else None

    def remove(self, job: Job) -> bool:
        entry = job.entry
        if entry is None or entry[3] is not job:
            return False
        _take(entry)
        self._n -= 1
        return True

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Job]:
        return (e[3] for e in self._dq if e[3] is not None)


class HeapQueue:
    """Smallest ``key(job)`` first (computed once at push); ties by arrival order."""

    def __init__(self, key: KeyFn) -> None:
        self._key = key
        self._heap: list[list[Any]] = []
        self._n = 0

    def push(self, job: Job) -> None:
        entry = [self._key(job), job.seq, next(_ticks), job]
        job.entry = entry
        heapq.heappush(self._heap, entry)
        self._n += 1

    def _clean(self) -> None:
        heap = self._heap
        while heap and heap[0][3] is None:
            heapq.heappop(heap)

    def pop(self) -> Job | None:
        self._clean()
        if not self._heap:
            return None
        self._n -= 1
        return _take(heapq.heappop(self._heap))

    def peek(self) -> Job | None:
        self._clean()
        return self._heap[0][3] if self._heap else None

    def remove(self, job: Job) -> bool:
        entry = job.entry
        if entry is None or entry[3] is not job:
            return False
        _take(entry)
        self._n -= 1
        if self._n == 0:
            self._heap.clear()
        return True

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Job]:
        return (e[3] for e in self._heap if e[3] is not None)


class BoundedWaitQueue(HeapQueue):
    """A key heap plus a FIFO view of the same entries: a job ready for longer than
    ``bound`` seconds goes next, oldest first; otherwise the smallest key.

    Pushes happen at the clock's "now", which never goes back, so push order is
    ``ready_since`` order and the FIFO view is a plain deque. An entry popped
    through one view is dead in the other (they share it).
    """

    def __init__(self, key: KeyFn, bound: float, clock: Clock) -> None:
        super().__init__(key)
        self._bound = bound
        self._clock = clock
        self._dq: deque[list[Any]] = deque()

    def push(self, job: Job) -> None:
        super().push(job)
        assert job.entry is not None
        self._dq.append(job.entry)

    def _head(self) -> list[Any] | None:
        dq = self._dq
        while dq and dq[0][3] is None:
            dq.popleft()
        if dq and self._clock.now() - dq[0][3].ready_since > self._bound:
            return dq[0]
        self._clean()
        return self._heap[0] if self._heap else None

    def pop(self) -> Job | None:
        entry = self._head()
        if entry is None:
            return None
        self._n -= 1
        return _take(entry)

    def peek(self) -> Job | None:
        entry = self._head()
        return None if entry is None else entry[3]

    def remove(self, job: Job) -> bool:
        removed = super().remove(job)
        if removed and self._n == 0:
            self._dq.clear()
        return removed
