"""Admission beyond the queue bound: per-tenant caps and deadline-aware shedding.

The queue bound (``SchedulerCore.submit``: ``QueueFullError``) keeps memory and
waiting flat under overload; two more refusals keep it fair and useful:

- **Tenant caps** (:class:`TenantCaps`): one tenant may hold at most ``cap`` of
  the waiting places, so a tenant that floods the scheduler is refused
  (``TenantCapError``) while the others are still admitted. Only waiting jobs
  count (running ones hold a worker slot, not a queue place), counted from the
  core's own job states, so no path that ends a job has to remember to give a
  place back.
- **Deadline shedding** (:func:`deadline_refusal`): a request whose deadline
  cannot be met given the work the policy serves before it and its own
  predicted service is refused before it is accepted, instead of waiting its
  whole deadline for nothing while it holds a place.

Both estimates use what the core knows: the predictions of the queued and
running jobs, the policy's order (its ready-queue keys) and the seconds a job
takes per predicted token (``TokenTime``: learned by ssjf-aging's queue, or
here for the other policies). Pure like the rest of the core: every time comes
in as an argument.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.scheduler.core.bands import rank
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.queue import TokenTime
from services.scheduler.core.scheduler import SchedulerCore

WAITING = frozenset({JobState.QUEUED, JobState.PREDICTED, JobState.PREEMPTED})

# A retry hint is never shorter or longer than these (seconds); without any
# estimate of service time it is DEFAULT_RETRY_AFTER_S.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0
DEFAULT_RETRY_AFTER_S = 1.0


class TenantCapError(Exception):
    """One tenant already holds its share of the queue: RESOURCE_EXHAUSTED."""

    def __init__(self, tenant: str, waiting: int, cap: int) -> None:
        super().__init__(
            f"tenant {tenant!r} already has {waiting} requests waiting, its cap "
            f"(tenant_queue_share of the queue limit) is {cap}"
        )
        self.tenant = tenant
        self.waiting = waiting
        self.cap = cap


def tenant_cap(queue_limit: int, share: float) -> int | None:
    """The waiting places one tenant may hold; None when ``share`` >= 1 (no cap)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"tenant_queue_share must be in (0, 1], got {share}")
    if share >= 1.0:
        return None
    return max(1, math.floor(share * queue_limit))


class TenantCaps:
    """Each tenant's job ids, to count its waiting jobs when it nears its cap.

    The ids are never removed one by one when a job ends: the set is pruned of
    jobs the core no longer has (``live``) whenever it reaches the cap, which
    keeps it at most ``cap`` plus the tenant's running jobs plus what arrived
    since the last prune, whatever path ended the others. ``exempt`` tenants
    (the anonymous one, when no tokens file names tenants) are not capped: a
    single tenant would only lose part of the queue to a cap."""

    def __init__(self, cap: int | None, exempt: Iterable[str] = ("",)) -> None:
        self.cap = cap
        self.exempt = frozenset(exempt)
        self._ids: dict[str, set[Any]] = {}

    def check(self, tenant: str, state: Callable[[Any], JobState | None]) -> None:
        """Raises TenantCapError when ``tenant`` holds ``cap`` waiting jobs.

        ``state(job_id)`` is the core's state of a job, None once the core forgot it."""
        cap = self.cap
        if cap is None or tenant in self.exempt:
            return
        ids = self._ids.get(tenant)
        if ids is None or len(ids) < cap:
            return  # fewer jobs than the cap at all: no need to look at their states
        waiting = 0
        for job_id in list(ids):
            s = state(job_id)
            if s is None:
                ids.discard(job_id)
            elif s in WAITING:
                waiting += 1
        if waiting >= cap:
            raise TenantCapError(tenant, waiting, cap)

    def add(self, tenant: str, job_id: Any) -> None:
        if self.cap is None or tenant in self.exempt:
            return
        self._ids.setdefault(tenant, set()).add(job_id)

    def tracked(self, tenant: str) -> int:
        """Ids kept for ``tenant`` (for tests of the bound)."""
        return len(self._ids.get(tenant, ()))


@dataclass(frozen=True, slots=True)
class Estimate:
    """When a job would start and finish, in seconds from now."""

    start_s: float
    service_s: float

    @property
    def finish_s(self) -> float:
        return self.start_s + self.service_s


def start_after(busy_s: Iterable[float], slots: int, ahead_s: Iterable[float]) -> float:
    """When a job starts behind ``ahead_s`` (the services of the jobs served before it),
    on ``slots`` slots of which some are busy for ``busy_s`` more seconds: each job
    ahead takes the slot that frees first (list scheduling), and so does this one."""
    free = sorted(busy_s)
    if len(free) < slots:
        free = [0.0] * (slots - len(free)) + free
    if not free:
        return math.inf
    heapq.heapify(free)
    for service in ahead_s:
        heapq.heapreplace(free, free[0] + service)
    return free[0]


def deadline_refusal(time_left_s: float, estimate: Estimate, margin: float) -> str | None:
    """Why a request with ``time_left_s`` until its deadline is refused, or None.

    Refused only when the estimate exceeds the time left by more than ``margin``
    (a fraction; negative refuses earlier): a length prediction is often off by
    half, and a request refused here that would have made it is lost to its
    caller, while one admitted that misses is cancelled at its deadline anyway."""
    if estimate.finish_s <= time_left_s * (1.0 + margin):
        return None
    return (
        f"deadline cannot be met: about {estimate.finish_s:.2f} s needed "
        f"({estimate.start_s:.2f} s of queued and running work ahead, "
        f"{estimate.service_s:.2f} s to generate), {max(time_left_s, 0.0):.2f} s left; "
        "retry with a longer deadline or later"
    )


def retry_after(busy_s: Iterable[float]) -> float:
    """Seconds until a refused request is worth retrying: when the first running job
    is expected to end and a place moves up (default without any estimate)."""
    soonest = min(busy_s, default=None)
    if soonest is None or not math.isfinite(soonest) or soonest <= 0.0:
        return DEFAULT_RETRY_AFTER_S
    return min(max(soonest, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


class AdmissionControl:
    """The core's knowledge turned into admission answers, for one ``SchedulerCore``."""

    def __init__(
        self,
        core: SchedulerCore,
        *,
        tenant_share: float = 1.0,
        deadline_margin: float = 0.2,
        exempt_tenants: Iterable[str] = ("",),
    ) -> None:
        if not deadline_margin > -1.0:
            raise ValueError(f"deadline_shed_margin must be > -1, got {deadline_margin}")
        self.core = core
        self.margin = deadline_margin
        self.tenants = TenantCaps(tenant_cap(core.queue_limit, tenant_share), exempt_tenants)
        # Seconds per predicted token, learned from finished runs, for a policy whose
        # queue learns none (every policy but ssjf-aging).
        self.token_time = TokenTime()

    # ---- tenants ---------------------------------------------------------------

    def check_tenant(self, tenant: str) -> None:
        """Raises TenantCapError when ``tenant`` holds its share of the queue."""
        self.tenants.check(tenant, self._state)

    def admitted(self, tenant: str, job: Job) -> None:
        self.tenants.add(tenant, job.id)

    def _state(self, job_id: Any) -> JobState | None:
        job = self.core.get(job_id)
        return None if job is None else job.state

    # ---- service time ------------------------------------------------------------

    def observe_finished(self, job: Job) -> None:
        """A job ended: its last run teaches the seconds per predicted token."""
        if job.state is not JobState.DONE or job.finish is None or job.first_dispatch is None:
            return
        if math.isnan(job.predicted):
            return
        rest = job.predicted - job.run_start_generated
        self.token_time.observe(job.finish - job.run_started, rest if rest > 1.0 else 1.0)

    def seconds_per_token(self) -> float:
        """The queue's learned or configured token time, else this running estimate."""
        learned = self.core.queue.token_time_s
        return learned if learned > 0.0 else self.token_time.value

    def _busy(self, token_s: float) -> list[float]:
        core = self.core
        remaining = core.policy.remaining
        busy = []
        for w in core.workers.values():
            for job_id in w.jobs:
                job = core.get(job_id)
                if job is not None and not job.terminal:
                    busy.append(remaining(job) * token_s)
        return busy

    def estimate(self, job: Job) -> Estimate | None:
        """When a queued ``job`` would start and finish; None without a token time or
        a worker (nothing to estimate from)."""
        token_s = self.seconds_per_token()
        core = self.core
        slots = sum(w.slots for w in core.workers.values())
        entry = job.entry
        if token_s <= 0.0 or slots == 0 or entry is None:
            return None
        remaining = core.policy.remaining
        mine = rank(job)
        # Jobs the policy serves first: a higher band, or the same band and a smaller key
        # (arrival order for FIFO), as in ``SchedulerCore.position``. Jobs still awaiting
        # a prediction are not counted.
        ahead = (
            remaining(other) * token_s
            for other in core.queue
            if other is not job and other.entry is not None and rank(other) < mine
        )
        start = start_after(self._busy(token_s), slots, ahead)
        return Estimate(start, remaining(job) * token_s)

    def deadline_problem(self, job: Job, now: float) -> str | None:
        """Why ``job`` (queued with its prediction) cannot meet its deadline, or None."""
        if job.deadline is None:
            return None
        est = self.estimate(job)
        if est is None:
            return None
        return deadline_refusal(job.deadline - now, est, self.margin)

    def retry_after_s(self) -> float:
        """The retry hint for a refused request (``grpc-retry-pushback-ms``)."""
        token_s = self.seconds_per_token()
        if token_s <= 0.0:
            return DEFAULT_RETRY_AFTER_S
        return retry_after(self._busy(token_s))


class PriorityCapError(PermissionError):
    """A request asked for a priority band above its tenant's ``max_priority`` (raised
    by the service's tenancy check; here so the refusal counter can name it)."""


class HintNotAllowedError(PermissionError):
    """A request sent a length_hint its tenant may not send (``length_hints``)."""
