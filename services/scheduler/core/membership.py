"""Worker membership in the core: joining, pausing, leaving.

A worker is in one of three conditions:

- accepting: on the slot board, dispatch may place jobs on it;
- present but not accepting (its Triton is down, it is draining): its running
  jobs go on, no new job is placed on it, and it keeps its place in the pool,
  so it need not register again (and lose what it runs) when it serves again;
- gone (``on_worker_lost``): its running jobs are requeued to resume elsewhere,
  or fail once their retries are spent.

A mixin of :class:`~services.scheduler.core.scheduler.SchedulerCore` (kept
apart so that module stays small); it uses the core's tables and its
``_end``/``_requeue``, which the core defines.

Every job the core ends (done, cancelled, failed, whichever event did it) is
appended to ``ended`` when the driver asked for that list: a driver that must
answer a client for each job (the service) ends them all from one place,
instead of trusting each event's caller to notice.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.scheduler.core.batching import Batching
from services.scheduler.core.clock import Clock
from services.scheduler.core.interface import SchedulerInterface
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.placement import SlotBoard, WorkerSlots


class MembershipInterface(SchedulerInterface, Protocol):
    """What a driver that tracks workers' readiness and ends jobs' streams calls
    beyond :class:`SchedulerInterface`."""

    # Set to a list by a driver that wants every newly terminal job reported.
    ended: list[Job] | None

    def set_accepting(self, worker_id: Any, accepting: bool) -> bool: ...


class WorkerMembership:
    # The core's own state (set by SchedulerCore.__init__).
    clock: Clock
    batching: Batching
    max_requeues: int
    requeued: int
    _board: SlotBoard
    _workers: dict[Any, WorkerSlots]
    _jobs: dict[Any, Job]
    _running: int
    _preempting: set[Any]

    def _end(self, job: Job, state: JobState, reason: str, now: float) -> None:
        raise NotImplementedError  # SchedulerCore's

    def _requeue(self, job: Job, now: float) -> None:
        raise NotImplementedError  # SchedulerCore's

    def add_worker(self, worker_id: Any, slots: int, attachment: Any = None) -> None:
        """Registers a worker (again after a restart: its old jobs are requeued).

        ``attachment`` is the driver's own record of the worker (the service's
        connection), kept on ``workers[worker_id].attachment`` so that the driver
        needs no registry of its own."""
        if slots < 1:
            raise ValueError(f"worker slots must be >= 1, got {slots}")
        if worker_id in self._workers:
            self.on_worker_lost(worker_id)
        w = WorkerSlots(worker_id, self.batching.usable_slots(slots), attachment)
        self._workers[worker_id] = w
        self._board.add(w)

    def set_accepting(self, worker_id: Any, accepting: bool) -> bool:
        """Stops (or resumes) placing jobs on a worker that stays in the pool; its
        running jobs are left alone. True when that changed anything."""
        w = self._workers.get(worker_id)
        return w is not None and self._board.set_accepting(w, accepting)

    def on_worker_lost(self, worker_id: Any) -> list[Job]:
        """Removes the worker; its jobs go back to the queue to resume elsewhere (or
        fail, reported in ``ended``, once their retries are spent)."""
        w = self._workers.pop(worker_id, None)
        if w is None:
            return []
        self._board.discard(w)
        w.alive = False
        now = self.clock.now()
        requeued: list[Job] = []
        for job_id in list(w.jobs):
            job = self._jobs[job_id]
            job.worker = None
            self._running -= 1
            self._preempting.discard(job_id)
            if job.state is JobState.RUNNING or job.state is JobState.PREEMPTED:
                if job.state is JobState.RUNNING:
                    job.to(JobState.PREEMPTED)
                job.requeues += 1
                self.requeued += 1
                if job.requeues > self.max_requeues:
                    self._end(job, JobState.FAILED, "error", now)
                    continue
                self._requeue(job, now)
                requeued.append(job)
            else:  # cancelled while running: nothing left to do
                del self._jobs[job_id]
        return requeued

    @property
    def workers(self) -> dict[Any, WorkerSlots]:
        return self._workers
