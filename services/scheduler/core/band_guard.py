"""Band guard: what a higher priority band needs beyond queue order when bands share a batch.

Strict bands decide who starts next; in continuous batching that is not all a
higher band feels. A worker's decode step costs ``a + b * batch``, so a batch
full of lower-band jobs slows the higher band's running jobs, and a higher-band
job that arrives to full slots waits for one to free. Three mechanisms, each
off unless configured (``GuardSettings``; ``SchedulerConfig`` has them as
``band_preempt``, ``band_reserve_*`` and ``band_cap_*``):

- **preempt**: a queued job that finds no slot it may take stops the running job
  of a lower band (lowest band first) with the most remaining work net of its
  recompute (the policy's ``PreemptionRule.recompute_cost`` per prompt and
  generated token; a job whose remaining work is below that cost is left to
  finish), at most ``max_per_job`` times per job. Any policy, none and continuous
  batching; it removes the higher band's wait for a slot, not the slow steps.
- **reserve** ``r``: while a higher band is active (a job of it running, or one
  queued within ``reserve_window_s``), lower bands fill at most ``K - r`` of a
  worker's slots, so a higher-band job starts at once.
- **cap** ``c``: while a worker runs a job of a higher band, lower-band jobs start
  there only while it runs fewer than ``c`` jobs (bounding the step the higher
  band pays); with ``cap_shrink`` lower-band jobs above ``c`` are stopped too.

None of them changes anything while every job is of one band: the reservation and
the cap only ever hold a job back for a *higher* band, and preemption only stops a
job of a band below the one queued, so throughput without priorities is unchanged.
Dynamic batching is left alone: a batch runs to its end, and its size is the
batching mode's own setting.

Costs per decision: O(bands) for a worker's highest running band and a band's
activity, O(log n) amortized for a victim (one lazy max-heap of running jobs per
band, keyed by remaining work at dispatch, at most ``_SCAN`` entries refreshed per
check), O(K) for a shrink (a worker's own jobs). Placement tries the least-loaded
worker first; only when the guard refuses it does it look further (``SlotBoard.
pick_first``, O(max slots + workers refused)).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.scheduler.core.job import Job, JobState
from services.scheduler.core.placement import SlotBoard, WorkerSlots
from services.scheduler.core.policies import Policy, PreemptionRule
from services.scheduler.core.queue import ReadyQueue

RUNNING = JobState.RUNNING
_SCAN = 8  # running jobs refreshed per victim check beyond those ruled out for good


@dataclass(frozen=True)
class GuardSettings:
    """The band guard's mechanisms (module doc); all off: the core's neutral default."""

    preempt: bool = False
    reserve_slots: int = 0  # 0: no reservation
    reserve_window_s: float = 0.0  # a band stays active this long after a job of it queued
    cap_slots: int = 0  # 0: no cap
    cap_shrink: bool = False  # also stop lower-band jobs above the cap

    def __post_init__(self) -> None:
        if self.reserve_slots < 0 or self.cap_slots < 0:
            raise ValueError("band_reserve_slots and band_cap_slots must be >= 0 (0: off)")
        if not self.reserve_window_s >= 0:
            raise ValueError(f"band_reserve_window_s must be >= 0, got {self.reserve_window_s}")

    @property
    def active(self) -> bool:
        return self.preempt or self.reserve_slots > 0 or self.cap_slots > 0


class BandGuard:
    """Per-worker running counts by band, running jobs by band, and the bands' last
    queue times; the core reports starts, releases and queued jobs to it."""

    def __init__(
        self,
        settings: GuardSettings,
        policy: Policy,
        progress: Callable[[Job], int] | None,
        jobs: Mapping[Any, Job],
    ) -> None:
        self.settings = settings
        self._policy = policy
        self._progress = progress
        self._jobs = jobs
        rule = policy.preemption or PreemptionRule()
        self._recompute = rule.recompute_cost
        self._max_per_job = rule.max_per_job
        self._heaps: dict[int, list[tuple[float, int, int, Job]]] = {}
        self._bands_on: dict[Any, dict[int, int]] = {}  # worker id -> band -> jobs running
        self._running: dict[int, int] = {}  # band -> jobs running anywhere
        self._queued_at: dict[int, float] = {}  # band -> when a job of it last queued
        self._shrink: set[Any] = set()  # workers that may hold lower-band jobs above the cap

    # ---- events from the core ------------------------------------------------

    def queued(self, job: Job, now: float) -> None:
        self._queued_at[job.priority] = now

    def started(self, job: Job, w: WorkerSlots) -> None:
        band = job.priority
        on = self._bands_on.setdefault(w.id, {})
        on[band] = on.get(band, 0) + 1
        self._running[band] = self._running.get(band, 0) + 1
        if self.settings.preempt:
            heap = self._heaps.setdefault(band, [])
            heapq.heappush(heap, (-self._policy.remaining(job), job.seq, job.run_token, job))
            if len(heap) > 2 * self._running[band] + 64:
                # Entries of ended runs linger until they surface; with one band nobody
                # looks, so drop them now and then (amortized O(1) per start).
                live = [e for e in heap if e[3].state is RUNNING and e[3].run_token == e[2]]
                heapq.heapify(live)
                self._heaps[band] = live
        if self.settings.cap_shrink and self.settings.cap_slots and len(on) > 1:
            self._shrink.add(w.id)

    def released(self, job: Job, worker_id: Any) -> None:
        band = job.priority
        on = self._bands_on.get(worker_id)
        if on is not None and band in on:
            on[band] -= 1
            if not on[band]:
                del on[band]
            self._running[band] -= 1

    # ---- placement -----------------------------------------------------------

    def _above(self, w: WorkerSlots, band: int) -> int:
        """Jobs of bands above ``band`` running on ``w``."""
        on = self._bands_on.get(w.id)
        return sum(n for b, n in on.items() if b > band) if on else 0

    def _higher_active(self, band: int, now: float) -> bool:
        horizon = now - self.settings.reserve_window_s
        for b, t in self._queued_at.items():
            if b > band and (t >= horizon or self._running.get(b, 0)):
                return True
        return False

    def place(self, job: Job, board: SlotBoard, now: float) -> WorkerSlots | None:
        """A worker with a free slot that ``job`` may take, least loaded first, or None."""
        w = board.pick()
        if w is None or len(self._queued_at) < 2:
            return w  # one band seen: nothing to guard against
        band = job.priority
        s = self.settings
        reserve = s.reserve_slots if s.reserve_slots and self._higher_active(band, now) else 0
        cap = s.cap_slots

        def ok(w: WorkerSlots) -> bool:
            above = self._above(w, band) if (cap or reserve) else 0
            if cap and above and w.used >= cap:
                return False
            return not reserve or w.used - above < w.slots - reserve

        if not (cap or reserve) or ok(w):
            return w
        return board.pick_first(ok)

    def fill(
        self,
        queue: ReadyQueue,
        board: SlotBoard,
        now: float,
        start: Callable[[Job, WorkerSlots, list[Any]], None],
        decisions: list[Any],
    ) -> None:
        """The core's continuous / none dispatch with the guard: the queue's head starts on
        a worker it may take, or stays queued (and so does every job behind it: they are
        of its band or lower, which the guard holds back at least as much)."""
        while board.free and len(queue):
            job = queue.peek()
            w = None if job is None else self.place(job, board, now)
            if w is None or job is None:
                return
            queue.pop()
            board.take(w)
            start(job, w, decisions)

    # ---- preemption ----------------------------------------------------------

    def _net(self, job: Job) -> float:
        """Remaining work saved by stopping ``job`` now, less what recomputing it costs."""
        if self._progress is not None:
            job.generated = self._progress(job)
        cost = self._recompute * (job.prompt_tokens + job.generated)
        return self._policy.remaining(job) - cost

    def victim(self, queue: ReadyQueue, workers: Mapping[Any, WorkerSlots]) -> Job | None:
        """A running job to stop, or None: first a lower-band job above the cap on a
        worker running a higher band, then one for the queue's head, which ``fill`` left
        queued because it found no slot it may take."""
        s = self.settings
        while self._shrink:
            wid = next(iter(self._shrink))
            w = workers.get(wid)
            on = self._bands_on.get(wid)
            if w is None or not on or len(on) < 2 or w.used <= s.cap_slots:
                self._shrink.discard(wid)
                continue
            top = max(on)
            best: Job | None = None
            best_net = 0.0
            for jid in w.jobs:
                j = self._jobs.get(jid)
                if j is None or j.state is not RUNNING or j.priority >= top:
                    continue
                if j.preemptions >= self._max_per_job:
                    continue
                net = self._net(j)
                if net > best_net:
                    best, best_net = j, net
            if best is not None:
                return best
            self._shrink.discard(wid)
        blocked = queue.peek() if s.preempt and len(queue) else None
        if blocked is None:
            return None
        for band in sorted(b for b in self._heaps if b < blocked.priority):
            got = self._pop_victim(self._heaps[band])
            if got is not None:
                return got
        return None

    def _pop_victim(self, heap: list[tuple[float, int, int, Job]]) -> Job | None:
        """The job with the most remaining work net of recompute among the heap's top
        entries; keys at dispatch only shrink as a job runs, so the top holds the largest."""
        kept: list[tuple[float, int, int, Job]] = []
        best: tuple[float, int, int, Job] | None = None
        best_net = 0.0
        while heap and len(kept) < _SCAN:
            entry = heapq.heappop(heap)
            neg_rest, _, token, job = entry
            if job.state is not RUNNING or job.run_token != token:
                continue  # stale: finished, stopped, or running again under a new entry
            if job.preemptions >= self._max_per_job:
                continue  # ruled out for good
            if -neg_rest <= best_net:
                kept.append(entry)
                break  # nobody below can save more
            net = self._net(job)
            if net > best_net:
                if best is not None:
                    kept.append(best)
                best, best_net = entry, net
            else:
                kept.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        return None if best is None else best[3]
