"""The typed boundary between the scheduling core and whatever drives it.

Like vLLM v1's ``SchedulerInterface`` and ``SchedulerOutput``: a driver (the
gRPC service, the simulator) reports events to :class:`SchedulerInterface`
and gets back decisions and statistics as dataclasses, never dicts or tuples
it has to index. ``dispatch()`` returns :class:`Assign` (run this job on that
worker) and :class:`Stop` (stop this job on that worker; report
``on_stopped`` once it has); ``stats()`` returns :class:`CoreStats`.
Admission errors live here too, so a driver imports them from the boundary.

Nothing here imports a clock, gRPC or asyncio: the core is pure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from services.scheduler.core.job import Job
from services.scheduler.core.placement import WorkerSlots


class QueueFullError(Exception):
    """Admission refused: the service maps it to RESOURCE_EXHAUSTED."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"queue is full: {depth} requests waiting, limit {limit}")
        self.depth = depth
        self.limit = limit


class DuplicateJobError(ValueError):
    """A job id that is already live was submitted again."""


@dataclass(frozen=True, slots=True)
class Assign:
    """Run ``job`` on ``worker_id`` (from what it has generated so far)."""

    job: Job
    worker_id: Any


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop ``job`` on ``worker_id``; its slot is held until the driver calls ``on_stopped``."""

    job: Job
    worker_id: Any
    preempt: bool  # True: requeue after the stop; False: cancelled for good


Decision = Assign | Stop


@dataclass(frozen=True, slots=True)
class CoreStats:
    """Counters and gauges of one core, read by GetStats, metrics and the simulator."""

    policy: str
    batching: str
    queue_depth: int  # awaiting a prediction + in the ready queue
    running: int
    submitted: int
    completed: int
    cancelled: int
    failed: int
    preemptions: int
    requeued: int
    predictor_fallbacks: int
    cache_hits: int
    cache_lookups: int
    workers: int
    free_slots: int
    # ssjf-aging's guard, for tuning its JCT target: how many jobs reached their latest
    # start, and the seconds per predicted token it plans with (0 for other queues).
    late_jobs: int
    token_time_s: float


class SchedulerInterface(Protocol):
    """What a driver may call; :class:`~services.scheduler.core.scheduler.SchedulerCore`
    is the one implementation."""

    def add_worker(self, worker_id: Any, slots: int, attachment: Any = None) -> None: ...
    def on_worker_lost(self, worker_id: Any) -> list[Job]: ...
    def submit(self, job: Job, *, readmit: bool = ...) -> None: ...
    def on_prediction(
        self, job_id: Any, predicted: float | None, source: str = ..., embedding: Any = None
    ) -> Job | None: ...
    def dispatch(self) -> list[Decision]: ...
    def on_progress(self, job_id: Any, generated: int) -> None: ...
    def on_finish(self, job_id: Any, reason: str = ..., generated: int | None = None) -> Job: ...
    def on_cancel(self, job_id: Any, reason: str = ...) -> Stop | None: ...
    def on_stopped(self, job_id: Any, generated: int | None = None) -> Job | None: ...
    def on_run_failed(
        self, job_id: Any, generated: int | None = None, *, retry: bool = True
    ) -> Job | None: ...
    def expire(self) -> list[tuple[Job, Stop | None]]: ...
    def next_timer(self) -> float | None: ...
    def get(self, job_id: Any) -> Job | None: ...
    def __iter__(self) -> Iterator[Job]: ...
    def position(self, job: Job) -> int: ...
    def stats(self) -> CoreStats: ...
    @property
    def workers(self) -> dict[Any, WorkerSlots]: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def free_slots(self) -> int: ...
