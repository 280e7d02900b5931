"""Whom to preempt: the running job with the most remaining work, if it clearly pays.

The core keeps running jobs in a max-heap by the policy's remaining key at
dispatch (``RunningHeap``). When every slot is busy and a job waits, the
heap's top is compared with the best queued job under the policy's
:class:`~services.scheduler.core.policies.PreemptionRule`. Entries go stale
lazily (a job that finished, or was dispatched again with a new
``run_token``) and are dropped when they surface. A job ruled out for good
(preempted its maximum number of times, or too far along) leaves the heap; at
most ``_PREEMPT_SCAN`` others are looked at per check, so a check stays
O(log n) however many jobs run.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection
from typing import Any

from services.scheduler.core.job import Job, JobState
from services.scheduler.core.policies import Policy

RUNNING = JobState.RUNNING

# Running jobs looked at per preemption check beyond those ruled out for good.
_PREEMPT_SCAN = 8


class RunningHeap:
    """Running jobs by remaining key, largest first (entries ``(-remaining, seq, token, job)``)."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Job]] = []

    def add(self, job: Job, remaining: float) -> None:
        heapq.heappush(self._heap, (-remaining, job.seq, job.run_token, job))

    def victim(
        self,
        policy: Policy,
        best: Job,
        progress: Callable[[Job], int] | None,
        spare: Collection[Any] = (),
        *,
        across: bool = False,
    ) -> Job | None:
        """The running job to stop for ``best``, or None; it leaves the heap.

        ``across``: these running jobs are of a lower band than ``best``, which goes
        first whatever their sizes, so neither the size factor nor the early-job bound
        applies (a band's latency is bought with the lower band's recompute, which
        ``bench.priority`` measures); a job is still preempted at most ``max_per_job``
        times, which bounds what one low job can lose.

        Jobs whose ids are in ``spare`` (those the same dispatch just started) are
        never chosen: the policy picked each over ``best`` a moment ago (the
        latest-start guard sends a late long job first), so stopping it at once
        would undo that choice and throw away its prefill."""
        rule = policy.preemption
        if rule is None:
            return None
        threshold = 0.0 if across else policy.remaining(best) * rule.factor
        heap = self._heap
        kept: list[tuple[float, int, int, Job]] = []
        victim: Job | None = None
        while heap and len(kept) < _PREEMPT_SCAN:
            entry = heap[0]
            neg_rem, _, token, job = entry
            if job.state is not RUNNING or job.run_token != token:
                heapq.heappop(heap)
                continue
            if -neg_rem <= threshold:
                break  # remaining keys only shrink: nobody below qualifies either
            if job.id in spare:
                heapq.heappop(heap)
                kept.append(entry)
                continue
            if job.preemptions >= rule.max_per_job:
                heapq.heappop(heap)
                continue
            if progress is not None:
                job.generated = progress(job)
            if not across and job.generated >= rule.max_fraction * job.predicted:
                heapq.heappop(heap)  # too far along, now and for ever
                continue
            heapq.heappop(heap)
            if policy.remaining(job) > threshold:
                victim = job
                break
            kept.append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        return victim
