"""SchedulerCore: the one object the service and the simulator both drive.

It owns the live jobs, the ready queue (built by the policy), the workers'
slots and the preemption bookkeeping. Drivers report events (``submit``,
``on_prediction``, ``on_progress``, ``on_finish``, ``on_cancel``,
``on_stopped``, ``on_worker_lost``) and ask ``dispatch()`` what to do next:
a list of :class:`Assign` (run this job on that worker) and :class:`Stop`
(stop this job on that worker; call ``on_stopped`` once it has). A slot is
released only when the driver says the worker let go of the job, so a worker
never holds more jobs than it has slots.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from services.scheduler.core.band_guard import BandGuard
from services.scheduler.core.bands import BandedQueue, BandSettings, rank
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.clock import Clock
from services.scheduler.core.fallback import FallbackPredictor
from services.scheduler.core.interface import (
    Assign,
    CoreStats,
    Decision,
    DuplicateJobError,
    QueueFullError,
    Stop,
)
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.membership import WorkerMembership
from services.scheduler.core.placement import SlotBoard, WorkerSlots
from services.scheduler.core.policies import Policy
from services.scheduler.core.preemption import RunningHeap
from services.scheduler.core.queue import ReadyQueue
from shortline.common.length_distribution import LengthDistribution, as_distribution

QUEUED = JobState.QUEUED
PREDICTED = JobState.PREDICTED
RUNNING = JobState.RUNNING
PREEMPTED = JobState.PREEMPTED
DONE = JobState.DONE
CANCELLED = JobState.CANCELLED
FAILED = JobState.FAILED

SOURCE_PREDICTOR = "predictor"
SOURCE_CACHE = "cache"
SOURCE_FALLBACK = "fallback"
SOURCE_ORACLE = "oracle"
SOURCE_HINT = "hint"  # the request's own length_hint


class SchedulerCore(WorkerMembership):
    def __init__(
        self,
        policy: Policy,
        batching: Batching,
        clock: Clock,
        *,
        queue_limit: int = 10_000,
        cache: SemanticCache | None = None,
        fallback: FallbackPredictor | None = None,
        progress: Callable[[Job], int] | None = None,
        max_requeues: int = 3,
        cap_at_max_tokens: bool = True,
        bands: BandSettings | None = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue limit must be >= 1, got {queue_limit}")
        self.policy = policy
        self.batching = batching
        self.clock = clock
        self.queue_limit = queue_limit
        self.cache = cache
        self.fallback = fallback or FallbackPredictor()
        # How many tokens a running job has generated so far. The service keeps
        # ``job.generated`` current from the stream; the simulator computes it.
        self._progress = progress
        self.max_requeues = max_requeues
        # A job never generates more than max_tokens, so a prediction above it is
        # capped. Benchmark mode turns this off: there max_tokens carries the
        # replayed true length, and capping at it would hand SSJF the oracle.
        self.cap_at_max_tokens = cap_at_max_tokens
        # The policy's queue until a job of another band than 0 arrives (or from the start
        # with fair share): then priority bands (strict, wait-bounded) over the policy's
        # queues. Without priorities nothing is added to a decision.
        self.bands = bands or BandSettings()
        self.queue: ReadyQueue = (
            BandedQueue(policy, clock, self.bands)
            if self.bands.fair_share
            else policy.make_queue(clock)
        )
        self._dynamic = batching.mode is BatchingMode.DYNAMIC
        self._board = SlotBoard()
        self._workers: dict[Any, WorkerSlots] = {}
        self._jobs: dict[Any, Job] = {}
        # Beyond queue order, what a higher band needs in a shared batch (band_guard.py).
        g = self.bands.guard
        self.guard = BandGuard(g, policy, progress, self._jobs) if g.active else None
        self._seq = itertools.count(1)
        self._awaiting_prediction = 0
        self._running = 0
        self._preempting: set[Any] = set()
        # One per band: a queued job may preempt only in its own band (by the rule) or
        # in a lower one, never in a higher one.
        self._running_heaps: dict[int, RunningHeap] = {}
        self._deadlines: list[tuple[float, int, Job]] = []
        self._window_start: float | None = None
        self.submitted = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.preemptions = 0
        self.requeued = 0
        self.ended: list[Job] | None = None  # a driver's list of newly ended jobs (membership)

    # ---- admission and prediction -------------------------------------------

    def submit(self, job: Job, *, readmit: bool = False) -> None:
        """Admits a job (state QUEUED, awaiting its prediction) or raises QueueFullError;
        ``readmit``: admitted before (reloaded after a restart), never refused."""
        if job.id in self._jobs:
            raise DuplicateJobError(f"job {job.id!r} is already live")
        depth = self._awaiting_prediction + len(self.queue)
        if depth >= self.queue_limit and not readmit:
            raise QueueFullError(depth, self.queue_limit)
        job.seq = next(self._seq)
        self._jobs[job.id] = job
        self._awaiting_prediction += 1
        self.submitted += 1
        if job.deadline is not None:
            heapq.heappush(self._deadlines, (job.deadline, job.seq, job))

    def on_prediction(
        self,
        job_id: Any,
        predicted: float | None,
        source: str = SOURCE_PREDICTOR,
        embedding: Any = None,
        quantiles: Sequence[float] | LengthDistribution | None = None,
    ) -> Job | None:
        """Queues the job by its prediction; a cache hit overrides it, ``None`` falls back.

        ``quantiles`` (at ``QUANTILE_LEVELS``, or a built distribution) go with the
        predictor's point only: a cache hit or a fallback drops them.

        Returns ``None`` when the job is no longer waiting for a prediction (a late
        answer for a cancelled job).
        """
        job = self._jobs.get(job_id)
        if job is None or job.state is not QUEUED:
            return None
        if embedding is not None and self.cache is not None:
            job.embedding = embedding
            hit = self.cache.lookup(job.length_model, embedding)
            if hit is not None:
                predicted, source = hit, SOURCE_CACHE
        if predicted is None or math.isnan(predicted):
            predicted, source = self.fallback.predict(job.length_model), SOURCE_FALLBACK
        if predicted < 1.0:
            predicted = 1.0
        if self.cap_at_max_tokens and predicted > job.max_tokens:
            predicted = float(job.max_tokens)
        job.predicted = predicted
        job.prediction_source = source
        if quantiles is not None and source != SOURCE_CACHE and source != SOURCE_FALLBACK:
            cap = job.max_tokens if self.cap_at_max_tokens else math.inf
            job.length_dist = as_distribution(quantiles, cap)
        job.to(PREDICTED)
        self._awaiting_prediction -= 1
        job.ready_since = self.clock.now()
        self._enqueue(job)
        return job

    def on_prediction_failed(self, job_id: Any) -> Job | None:
        return self.on_prediction(job_id, None)

    # ---- dispatch ------------------------------------------------------------

    def dispatch(self) -> list[Decision]:
        """What to start (and whom to preempt) now."""
        decisions: list[Decision] = []
        queue = self.queue
        board = self._board
        if self._dynamic:
            self._dispatch_dynamic(decisions)
        elif self.guard is not None:  # band_guard.py: it may hold the head back
            self.guard.fill(queue, board, self.clock.now(), self._start, decisions)
            if not self._preempting and (victim := self.guard.victim(queue, self._workers)):
                self._stop(victim, decisions)
        else:
            while board.free and len(queue):
                w = board.pick()
                job = queue.pop()
                if w is None or job is None:
                    break
                board.take(w)
                self._start(job, w, decisions)
        if (
            self.policy.preemption is not None
            and not self._dynamic
            and not board.free
            and not self._preempting
            and len(queue)
        ):
            self._maybe_preempt(decisions)
        return decisions

    def _dispatch_dynamic(self, decisions: list[Decision]) -> None:
        queue = self.queue
        board = self._board
        now = self.clock.now()
        while len(queue):
            w = board.pick_idle()
            if w is None:
                return
            n = len(queue)
            if n < w.slots:
                if self._window_start is None:
                    self._window_start = now
                if now < self._window_start + self.batching.wait_s:
                    return
            k = min(n, w.slots)
            board.take(w, w.slots)  # the batch holds every slot until its last job ends
            w.batch_left = k
            for _ in range(k):
                job = queue.pop()
                if job is None:
                    break
                self._start(job, w, decisions)
            self._window_start = None
        self._window_start = None

    def _start(self, job: Job, w: WorkerSlots, decisions: list[Decision]) -> None:
        job.to(RUNNING)
        now = self.clock.now()
        if job.first_dispatch is None:
            job.first_dispatch = now
        job.worker = w.id
        job.run_token += 1
        job.run_start_generated = job.generated
        job.run_started = now
        w.jobs[job.id] = None
        self._running += 1
        if self.guard is not None:
            self.guard.started(job, w)
        if self.policy.preemption is not None:
            heap = self._running_heaps.get(job.priority)
            if heap is None:
                heap = self._running_heaps[job.priority] = RunningHeap()
            heap.add(job, self.policy.remaining(job))
        decisions.append(Assign(job, w.id))

    def _maybe_preempt(self, decisions: list[Decision]) -> None:
        best = self.queue.peek()
        if best is None:
            return
        started = {d.job.id for d in decisions if isinstance(d, Assign)}
        victim = None
        # Lowest band first: a higher band's job displaces a lower band's before its own
        # band's, and never a higher band's.
        for band in sorted(b for b in self._running_heaps if b <= best.priority):
            victim = self._running_heaps[band].victim(
                self.policy, best, self._progress, started, across=band < best.priority
            )
            if victim is not None:
                break
        if victim is not None:
            self._stop(victim, decisions)

    def _stop(self, victim: Job, decisions: list[Decision]) -> None:
        victim.to(PREEMPTED)
        victim.preemptions += 1
        self.preemptions += 1
        self._preempting.add(victim.id)
        decisions.append(Stop(victim, victim.worker, True))

    # ---- running jobs --------------------------------------------------------

    def on_progress(self, job_id: Any, generated: int) -> None:
        """Tokens generated so far over all runs (what the client has received)."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.generated = generated
        if job.first_token is None and generated > 0:
            job.first_token = self.clock.now()

    def on_finish(self, job_id: Any, reason: str = "stop", generated: int | None = None) -> Job:
        """The job's last token was produced; its slot frees."""
        job = self._jobs[job_id]
        if generated is not None:
            job.generated = generated
        self._release(job)
        if job.state is CANCELLED or job.state is FAILED:
            del self._jobs[job_id]
            return job
        self._preempting.discard(job_id)
        now = self.clock.now()
        if job.first_token is None and job.generated > 0:
            job.first_token = now
        self._end(job, DONE, reason, now)
        self.completed += 1
        if job.first_dispatch is not None:
            self.queue.observe_run(job, now - job.run_started)
        if reason in ("stop", "length"):
            self.fallback.observe(job.length_model, job.generated)
            if self.cache is not None and job.embedding is not None:
                self.cache.insert(job.length_model, job.embedding, job.generated)
        return job

    def on_cancel(self, job_id: Any, reason: str = "cancelled") -> Stop | None:
        """Cancels in any live state; returns a Stop when a worker must be told."""
        job = self._jobs.get(job_id)
        if job is None or job.terminal:
            return None
        state = job.state
        now = self.clock.now()
        if state is QUEUED:
            self._awaiting_prediction -= 1
        elif state is PREDICTED:
            self.queue.remove(job)
        self.cancelled += 1
        job.to(CANCELLED)
        job.finish = now
        job.finish_reason = reason
        if self.ended is not None:
            self.ended.append(job)
        if state is RUNNING:
            return Stop(job, job.worker, False)  # slot held until on_stopped
        if state is PREEMPTED:
            return None  # its stop is already under way
        del self._jobs[job_id]
        return None

    def on_stopped(self, job_id: Any, generated: int | None = None) -> Job | None:
        """The worker let go of a job we stopped: requeue it (preempted) or forget it."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if generated is not None:
            job.generated = generated
        self._release(job)
        if self._preempting:
            self._preempting.discard(job_id)
        if job.state is PREEMPTED:
            self._requeue(job, self.clock.now())
        elif job.terminal:
            del self._jobs[job_id]
        return job

    def on_run_failed(
        self, job_id: Any, generated: int | None = None, *, retry: bool = True
    ) -> Job | None:
        """A run broke (worker gone, stream error): requeue, or fail once retries are spent."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if generated is not None:
            job.generated = generated
        self._release(job)
        self._preempting.discard(job_id)
        if job.terminal:
            del self._jobs[job_id]
            return job
        job.requeues += 1
        self.requeued += 1
        if not retry or job.requeues > self.max_requeues:
            self._end(job, FAILED, "error", self.clock.now())
            return job
        if job.state is RUNNING:
            job.to(PREEMPTED)
        self._requeue(job, self.clock.now())
        return job

    def expire(self) -> list[tuple[Job, Stop | None]]:
        """Cancels jobs past their deadline (reason "deadline"); with a Stop for the
        ones on a worker, which the driver must stop."""
        expired: list[tuple[Job, Stop | None]] = []
        heap = self._deadlines
        now = self.clock.now()
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            if self._jobs.get(job.id) is not job or job.terminal:
                continue
            expired.append((job, self.on_cancel(job.id, "deadline")))
        return expired

    def next_timer(self) -> float | None:
        """Earliest time the core wants ``dispatch``/``expire`` called without an event."""
        times = []
        if self._window_start is not None:
            times.append(self._window_start + self.batching.wait_s)
        while self._deadlines and self._deadlines[0][2].terminal:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times) if times else None

    # ---- internals -----------------------------------------------------------

    def _release(self, job: Job) -> None:
        worker_id = job.worker
        if worker_id is None:
            return
        job.worker = None
        self._running -= 1
        if self.guard is not None:
            self.guard.released(job, worker_id)
        w = self._workers.get(worker_id)
        if w is None:
            return
        del w.jobs[job.id]
        if self._dynamic:
            w.batch_left -= 1
            if w.batch_left <= 0:
                self._board.give_back(w, w.used)
        else:
            self._board.give_back(w)

    def _requeue(self, job: Job, now: float) -> None:
        job.to(PREDICTED)
        job.ready_since = now
        self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        if job.priority and not isinstance(self.queue, BandedQueue):
            self.queue = BandedQueue.adopt(self.policy, self.clock, self.bands, self.queue)
        if self.guard is not None:
            self.guard.queued(job, job.ready_since)
        self.queue.push(job)

    def _end(self, job: Job, state: JobState, reason: str, now: float) -> None:
        if job.state is PREDICTED:
            self.queue.remove(job)
        job.to(state)
        job.finish = now
        job.finish_reason = reason
        if state is FAILED:
            self.failed += 1
        self._jobs.pop(job.id, None)
        if self.ended is not None:
            self.ended.append(job)

    # ---- introspection -------------------------------------------------------

    def get(self, job_id: Any) -> Job | None:
        return self._jobs.get(job_id)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def position(self, job: Job) -> int:
        """Jobs ahead of ``job`` in the ready queue now (O(n); for the Accepted message)."""
        if job.entry is None:
            return len(self.queue)
        mine = rank(job)
        return sum(1 for other in self.queue if rank(other) < mine)

    @property
    def queue_depth(self) -> int:
        return self._awaiting_prediction + len(self.queue)

    @property
    def running(self) -> int:
        return self._running

    @property
    def free_slots(self) -> int:
        return self._board.free

    def stats(self) -> CoreStats:
        cache = self.cache
        return CoreStats(
            policy=self.policy.name,
            batching=self.batching.mode.value,
            queue_depth=self.queue_depth,
            running=self._running,
            submitted=self.submitted,
            completed=self.completed,
            cancelled=self.cancelled,
            failed=self.failed,
            preemptions=self.preemptions,
            requeued=self.requeued,
            predictor_fallbacks=self.fallback.used,
            cache_hits=cache.hits if cache else 0,
            cache_lookups=cache.lookups if cache else 0,
            workers=len(self._workers),
            free_slots=self._board.free,
            late_jobs=self.queue.late_jobs,
            token_time_s=self.queue.token_time_s,
        )
