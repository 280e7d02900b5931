"""The ready queue: one small interface, four implementations.

A queue states what it can do instead of being asked its class: every queue
answers ``late_jobs`` and ``token_time_s`` (the latest-start guard's counters),
which only :class:`SlackQueue` moves; the others answer 0.

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
    def observe_run(self, job: Job, seconds: float) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Job]: ...
    @property
    def late_jobs(self) -> int:
        """Jobs whose latest start came while they waited (0 without a latest-start guard)."""
        ...

    @property
    def token_time_s(self) -> float:
        """Seconds per predicted token the guard plans with (0 without one)."""
        ...


def _take(entry: list[Any]) -> Job:
    job: Job = entry[3]
    entry[3] = None
    job.entry = None
    return job


class _NoServiceEstimate:
    """What a queue without the latest-start guard answers: it learns nothing from runs
    and counts no late jobs (SlackQueue overrides all three)."""

    def observe_run(self, job: Job, seconds: float) -> None:
        """``job``'s run ended after ``seconds``; only a queue that estimates service uses it."""

    @property
    def late_jobs(self) -> int:
        return 0

    @property
    def token_time_s(self) -> float:
        return 0.0


class FifoQueue(_NoServiceEstimate):
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


class HeapQueue(_NoServiceEstimate):
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


class _GuardedHeapQueue(HeapQueue):
    """A key heap beside another view of the same entries that may pick first (a wait
    bound, a latest start). A subclass says which entry goes next (``_head``) and
    empties its views when the queue empties (``_clear_views``); popping, peeking and
    removal are the same for all of them."""

    def _head(self) -> list[Any] | None:
        raise NotImplementedError

    def _clear_views(self) -> None:
        raise NotImplementedError

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
            self._clear_views()
        return removed


class BoundedWaitQueue(_GuardedHeapQueue):
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

    def _clear_views(self) -> None:
        self._dq.clear()


class TokenTime:
    """Seconds a job spends on a worker per token of its prediction, as the scheduler sees it.

    Fixed when configured (``fixed > 0``); otherwise learned from finished runs as
    a ratio of moving averages (run seconds over the predicted tokens the run had
    left at its start), so it absorbs the workers' real batching, prefill and
    overheads and the predictor's bias. Zero until the first run finishes.
    """

    __slots__ = ("_alpha", "_fixed", "_seconds", "_tokens", "value")

    def __init__(self, fixed: float = 0.0, alpha: float = 0.02) -> None:
        self._fixed = fixed > 0.0
        self._alpha = alpha
        self._seconds = 0.0
        self._tokens = 0.0
        self.value = fixed if fixed > 0.0 else 0.0

    def observe(self, seconds: float, predicted_tokens: float) -> None:
        if self._fixed or predicted_tokens <= 0.0 or seconds < 0.0:
            return
        if self._tokens == 0.0:
            self._seconds, self._tokens = seconds, predicted_tokens
        else:
            a = self._alpha
            self._seconds += a * (seconds - self._seconds)
            self._tokens += a * (predicted_tokens - self._tokens)
        self.value = self._seconds / self._tokens


class SlackQueue(_GuardedHeapQueue):
    """A key heap guarded by a JCT target: jobs that would finish late go first.

    Each job's deadline is ``arrival + target`` (or its own deadline, when the
    caller's is earlier) and its latest start is the
    deadline minus its predicted service (remaining predicted tokens times the
    learned or configured token time). A wait bound promotes a long job no
    earlier than a short one although its completion is its wait plus a long
    service; the latest start promotes it early enough to finish by the target.
    A job is late once its latest start has passed, or passes within ``margin``
    times the service of the key heap's head (what serving that job first would
    cost it). Late jobs go first, smallest key first among them (in the
    reference simulation this keeps more of the mean gain than earliest
    deadline first, at the same p99); otherwise the smallest key.

    A second heap keyed by latest start feeds a heap of late jobs; all three
    share the entries, so removal stays lazy and every operation O(log n)
    amortized. A call moves at most ``max_moves`` newly late jobs (earliest
    latest start first): when more turn late at once (a burst of arrivals) they
    move over several decisions instead of stalling one, and the pick is the
    smallest key among those moved so far, still a late job. The latest start
    uses the token time when the job was queued.
    """

    def __init__(
        self,
        key: KeyFn,
        target_s: float,
        clock: Clock,
        remaining: KeyFn,
        token_time: TokenTime,
        margin: float = 0.0,
        max_moves: int = 4,
    ) -> None:
        super().__init__(key)
        self._max_moves = max_moves
        self._target = target_s
        self._clock = clock
        self._remaining = remaining
        self.token_time = token_time
        self._margin = margin
        self.turned_late = 0  # jobs whose latest start came while they waited
        self._slack: list[tuple[float, int, list[Any]]] = []  # (latest start, tick, entry)
        self._late: list[tuple[float, int, int, list[Any]]] = []  # (key, seq, tick, entry)

    @property
    def late_jobs(self) -> int:
        return self.turned_late

    @property
    def token_time_s(self) -> float:
        return self.token_time.value

    def latest_start(self, job: Job) -> float:
        """The job's own deadline (the caller's gRPC deadline) when it is earlier than
        arrival + target: each request is guarded by its own completion time."""
        due = job.arrival + self._target
        deadline = job.deadline
        if deadline is not None and deadline < due:
            due = deadline
        return due - self._remaining(job) * self.token_time.value

    def push(self, job: Job) -> None:
        super().push(job)
        entry = job.entry
        assert entry is not None
        slack = self._slack
        heapq.heappush(slack, (self.latest_start(job), entry[2], entry))
        if len(slack) > 2 * self._n + 64:
            # Entries popped through the key heap linger here until their latest start;
            # dropping them now and then keeps memory O(queued), amortized O(1) per push.
            self._slack = [e for e in slack if e[2][3] is not None]
            heapq.heapify(self._slack)

    def observe_run(self, job: Job, seconds: float) -> None:
        rest = job.predicted - job.run_start_generated
        self.token_time.observe(seconds, rest if rest > 1.0 else 1.0)

    def _head(self) -> list[Any] | None:
        self._clean()
        heap = self._heap
        horizon = self._clock.now()
        if self._margin > 0.0 and heap:
            horizon += self._margin * self._remaining(heap[0][3]) * self.token_time.value
        slack = self._slack
        late = self._late
        # At most max_moves per call: a burst of jobs turning late together moves over
        # several decisions (earliest latest start first) instead of stalling one.
        moves = self._max_moves
        while moves and slack and slack[0][0] <= horizon:
            entry = heapq.heappop(slack)[2]
            if entry[3] is not None:
                heapq.heappush(late, (entry[0], entry[1], entry[2], entry))
                moves -= 1
                self.turned_late += 1
        while late and late[0][3][3] is None:
            heapq.heappop(late)
        if late:
            return late[0][3]
        return heap[0] if heap else None

    def _clear_views(self) -> None:
        self._slack.clear()
        self._late.clear()
