"""The worker's K slots: which jobs run, and what each has streamed so far."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any


class SlotsFull(Exception):
    pass


class DuplicateJob(Exception):
    pass


@dataclass(eq=False)
class Job:
    job_id: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    # Exactly what the Execute stream has handed to gRPC, and its tokens.
    text: str = ""
    tokens: int = 0
    # Set by Cancel or Preempt (a FinishReason value); the stream stops at once.
    stop_reason: int | None = None
    # The Triton stream, to cancel it.
    stream: Any = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Slots:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"slots must be at least 1, got {total}")
        self.total = total
        self._jobs: dict[str, Job] = {}

    @property
    def used(self) -> int:
        return len(self._jobs)

    def acquire(self, job_id: str, model: str) -> Job:
        if job_id in self._jobs:
            raise DuplicateJob(job_id)
        if len(self._jobs) >= self.total:
            raise SlotsFull(job_id)
        job = Job(job_id, model)
        self._jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def release(self, job: Job) -> None:
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]
        job.done.set()
