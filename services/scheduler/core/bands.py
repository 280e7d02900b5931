"""Priority bands and fair share between tenants: the ready queue over the policy's queues.

``GenerateRequest.priority`` (absent = 0, higher = more urgent) puts a job in a
strict band: a job of a lower band starts only when no higher band has one
queued, and within a band the policy's own queue orders (fcfs, ssjf,
ssjf-aging with its latest-start guard, sjf-oracle). Strict bands alone starve
a lower band under a busy higher one, so a job of a lower band that has waited
``max_wait_s`` since it was last ready goes next, before every band, oldest
first: the wait of a lower band is bounded by ``max_wait_s`` plus the overdue
jobs queued before it, whatever the higher bands send.

With ``fair_share`` on, each band keeps one policy queue per tenant with work
queued and serves the tenant with the least attained service first
(:class:`ServiceLedger`: predicted tokens dispatched, decaying with a
half-life), then the policy's order within that tenant. One tenant that floods
a band then takes turns with the others instead of pushing their jobs back by
its whole backlog.

Costs per decision, with B bands and T tenants holding queued jobs in the
band served: O(log n) in the band's (tenant's) policy queue, O(B) to find the
highest non-empty band and the oldest overdue head of the lower bands (one
FIFO of entries per band, in push order, which is ready order because the
clock never goes back), O(log T) amortized in the tenant heap. B is the number
of distinct priorities in use, a handful in practice. Removal stays lazy: the
FIFOs share the policy queues' entries, whose job slot is cleared when taken.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from services.scheduler.core.band_guard import GuardSettings
from services.scheduler.core.clock import Clock
from services.scheduler.core.job import Job
from services.scheduler.core.policies import Policy
from services.scheduler.core.queue import ReadyQueue, TokenTime

# The wait bound of a lower band, in job times at capacity (seconds a worker spends per
# job at capacity), from ``python -m bench.priority`` (rho 0.9, alpaca test lengths, real
# head, 20% of the load in the high band, 10,000 requests): under strict bands the low
# band's p99 JCT is 55-66 job times, so a bound below that fires in normal operation and
# the promoted low jobs push the high band's p99 up (60 job times: 1.43-1.65x its p99
# alone, against 1.00-1.53x strict); at 120 it stays within 0.1x of strict and still
# bounds a lower band's wait when a higher band saturates the workers.
REFERENCE_BAND_MAX_WAIT_JOB_TIMES = 120.0
# The service's default (seconds): 120 job times where ssjf-aging's default JCT target
# (120 s, i.e. 21-33 job times in its reference tuning) puts a job time, about 4-6 s.
# A bound on starvation, not a latency target: a deployment that knows its job time
# sets 120 of them.
DEFAULT_BAND_MAX_WAIT_S = 600.0
DEFAULT_FAIR_SHARE_HALF_LIFE_S = 60.0
# exp() of the decay grows with time; values are rescaled before they could overflow.
_RESCALE_EXPONENT = 500.0


@dataclass(frozen=True)
class BandSettings:
    """How bands and tenants share the workers (``SchedulerConfig`` has the same names
    with a ``band_`` / ``fair_share`` prefix)."""

    max_wait_s: float = DEFAULT_BAND_MAX_WAIT_S  # 0: strict bands, no bound
    fair_share: bool = False  # the core's neutral default; the service turns it on
    half_life_s: float = DEFAULT_FAIR_SHARE_HALF_LIFE_S
    # What a higher band needs beyond queue order in a shared batch (core/band_guard.py).
    guard: GuardSettings = field(default_factory=GuardSettings)

    def __post_init__(self) -> None:
        if not self.max_wait_s >= 0:
            raise ValueError(f"band_max_wait_s must be >= 0 (0: no bound), got {self.max_wait_s}")
        if not self.half_life_s > 0:
            raise ValueError(f"fair_share_half_life_s must be > 0, got {self.half_life_s}")


class ServiceLedger:
    """Each tenant's attained service: predicted tokens dispatched, halving every
    ``half_life_s``.

    Decay without touching every tenant: a value is kept scaled by ``exp((t - t0) /
    tau)`` of the time it was charged, so values compare as they are at any one time;
    when the scale nears overflow every value is rescaled and ``epoch`` moves, which
    tells the tenant heaps to rebuild (once in hundreds of half-lives)."""

    __slots__ = ("_t0", "_tau", "epoch", "values")

    def __init__(self, half_life_s: float) -> None:
        self._tau = half_life_s / math.log(2.0)
        self._t0 = 0.0
        self.values: dict[str, float] = {}
        self.epoch = 0

    def charge(self, tenant: str, tokens: float, now: float) -> None:
        exponent = (now - self._t0) / self._tau
        if exponent > _RESCALE_EXPONENT:
            factor = math.exp(-exponent)
            self.values = {t: v * factor for t, v in self.values.items()}
            self._t0 = now
            self.epoch += 1
            exponent = 0.0
        self.values[tenant] = self.values.get(tenant, 0.0) + tokens * math.exp(exponent)

    def value(self, tenant: str) -> float:
        return self.values.get(tenant, 0.0)


_ticks = itertools.count()


class TenantShare:
    """One band's jobs, one policy queue per tenant; the least served tenant goes first.

    The tenant heap holds ``(attained, tick, tenant)`` for tenants with queued jobs.
    Attained service only grows (in the ledger's scaled units), so an entry that
    surfaces with an old value is pushed again with the current one (a lazy
    increase-key); an emptied tenant leaves the heap when it surfaces."""

    def __init__(self, make: Callable[[], ReadyQueue], ledger: ServiceLedger) -> None:
        self._make = make
        self._ledger = ledger
        self._epoch = ledger.epoch
        self._queues: dict[str, ReadyQueue] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._listed: set[str] = set()
        self._n = 0

    def _queue(self, tenant: str) -> ReadyQueue:
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = self._make()
        return q

    def push(self, job: Job) -> None:
        tenant = job.tenant
        self._queue(tenant).push(job)
        self._n += 1
        if tenant not in self._listed:
            self._listed.add(tenant)
            heapq.heappush(self._heap, (self._ledger.value(tenant), next(_ticks), tenant))

    def _head(self) -> ReadyQueue | None:
        ledger = self._ledger
        if ledger.epoch != self._epoch:  # values were rescaled: rebuild with the new ones
            self._epoch = ledger.epoch
            self._heap = [(ledger.value(t), next(_ticks), t) for t in self._listed]
            heapq.heapify(self._heap)
        heap = self._heap
        while heap:
            value, _, tenant = heap[0]
            q = self._queues[tenant]
            if not len(q):
                heapq.heappop(heap)
                self._listed.discard(tenant)
                continue
            current = ledger.value(tenant)
            if current != value:
                heapq.heapreplace(heap, (current, next(_ticks), tenant))
                continue
            return q
        return None

    def pop(self) -> Job | None:
        q = self._head()
        if q is None:
            return None
        job = q.pop()
        if job is not None:
            self._n -= 1
        return job

    def peek(self) -> Job | None:
        q = self._head()
        return None if q is None else q.peek()

    def remove(self, job: Job) -> bool:
        q = self._queues.get(job.tenant)
        if q is None or not q.remove(job):
            return False
        self._n -= 1
        return True

    def observe_run(self, job: Job, seconds: float) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            q.observe_run(job, seconds)

    @property
    def late_jobs(self) -> int:
        return sum(q.late_jobs for q in self._queues.values())

    @property
    def token_time_s(self) -> float:
        return next((q.token_time_s for q in self._queues.values()), 0.0)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Job]:
        return itertools.chain.from_iterable(list(self._queues.values()))


class BandedQueue:
    """The core's ready queue: strict bands over the policy's queues, with a wait bound
    for the lower bands and, optionally, fair share between tenants within a band.

    With every job in one band (no request sets ``priority``) it orders exactly as the
    policy's own queue: the wait bound only ever promotes a job of a band below the
    highest one queued."""

    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        settings: BandSettings,
        *,
        token_time: TokenTime | None = None,
        late_before: int = 0,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._bound = settings.max_wait_s if settings.max_wait_s > 0 else math.inf
        self._ledger = ServiceLedger(settings.half_life_s) if settings.fair_share else None
        # One token time for every queue the policy makes: they learn from every run.
        self.token_time = token_time if token_time is not None else TokenTime(policy.token_time)
        self._late_before = late_before  # counted by the policy queue this one replaced
        self._bands: dict[int, ReadyQueue] = {}
        self._fifos: dict[int, deque[list[Any]]] = {}
        self._order: list[int] = []  # -band, for bands that may hold jobs (lazy)
        self._listed: set[int] = set()
        self._n = 0

    def _make(self) -> ReadyQueue:
        return self._policy.make_queue(self._clock, self.token_time)

    def _band(self, band: int) -> ReadyQueue:
        q = self._bands.get(band)
        if q is None:
            ledger = self._ledger
            q = self._make() if ledger is None else TenantShare(self._make, ledger)
            self._bands[band] = q
            self._fifos[band] = deque()
        return q

    def push(self, job: Job) -> None:
        band = job.priority
        q = self._band(band)
        q.push(job)
        self._n += 1
        entry = job.entry
        assert entry is not None  # every policy queue sets it on push
        fifo = self._fifos[band]
        fifo.append(entry)
        if len(fifo) > 2 * len(q) + 64:
            # Entries popped through the policy queue linger until they reach the front;
            # dropping them now and then keeps memory O(queued), amortized O(1) per push.
            self._fifos[band] = deque(e for e in fifo if e[3] is not None)
        if band not in self._listed:
            self._listed.add(band)
            heapq.heappush(self._order, -band)

    def _top(self) -> int | None:
        order = self._order
        while order:
            band = -order[0]
            if len(self._bands[band]):
                return band
            heapq.heappop(order)
            self._listed.discard(band)
        return None

    def _overdue(self, top: int) -> list[Any] | None:
        """The entry of the oldest job of a band below ``top`` that has waited longer than
        the bound, or None."""
        if len(self._listed) < 2:
            return None
        horizon = self._clock.now() - self._bound
        oldest: list[Any] | None = None
        for band in self._listed:
            if band >= top:
                continue
            fifo = self._fifos[band]
            while fifo and fifo[0][3] is None:
                fifo.popleft()
            if fifo:
                entry = fifo[0]
                since = entry[3].ready_since
                if since < horizon and (oldest is None or since < oldest[3].ready_since):
                    oldest = entry
        return oldest

    def _next(self, take: bool) -> Job | None:
        top = self._top()
        if top is None:
            return None
        late = self._overdue(top)
        if late is not None:
            job: Job = late[3]
            if take:
                self._bands[job.priority].remove(job)
        else:
            q = self._bands[top]
            got = q.pop() if take else q.peek()
            if got is None:
                return None
            job = got
        if take:
            self._n -= 1
            if self._ledger is not None:
                self._ledger.charge(job.tenant, self._policy.remaining(job), self._clock.now())
        return job

    def pop(self) -> Job | None:
        return self._next(True)

    def peek(self) -> Job | None:
        return self._next(False)

    def remove(self, job: Job) -> bool:
        q = self._bands.get(job.priority)
        if q is None or not q.remove(job):
            return False
        self._n -= 1
        return True

    def observe_run(self, job: Job, seconds: float) -> None:
        q = self._bands.get(job.priority)
        if q is not None:
            q.observe_run(job, seconds)  # the token time is shared: any queue learns it

    @property
    def late_jobs(self) -> int:
        return self._late_before + sum(q.late_jobs for q in self._bands.values())

    @property
    def token_time_s(self) -> float:
        if self._policy.jct_target is None:
            return 0.0
        return self.token_time.value

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Job]:
        return itertools.chain.from_iterable(list(self._bands.values()))

    @classmethod
    def adopt(
        cls, policy: Policy, clock: Clock, settings: BandSettings, old: ReadyQueue
    ) -> BandedQueue:
        """A banded queue holding ``old``'s jobs (all of band 0), which it empties: O(n log n),
        once, on the core's first job with a priority. The token time and late count
        carry over."""
        banded = cls(
            policy,
            clock,
            settings,
            token_time=getattr(old, "token_time", None),
            late_before=old.late_jobs,
        )
        for job in sorted(old, key=lambda j: j.ready_since):  # the wait-bound FIFO's order
            old.remove(job)
            banded.push(job)
        return banded


def rank(job: Job) -> tuple[float, float, float]:
    """A queued job's place in the service order, ignoring wait bounds and fair share:
    higher band first, then the policy queue's key and arrival (its entry)."""
    entry = job.entry
    if entry is None:
        return (-job.priority, math.inf, math.inf)
    return (-job.priority, entry[0], entry[1])
