"""The worker's K slots: which executions run, and what each has streamed so far.

An :class:`Execution` is one ``Execute`` call holding a slot (the scheduler's
job, as it runs on this worker): it lives from ``acquire`` to ``release``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from services.worker.service.triton_client import TritonStream


class SlotsFull(Exception):
    pass


class DuplicateJob(Exception):
    pass


@dataclass(eq=False)
class Execution:
    job_id: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    # Exactly what the Execute stream has taken from Triton and sends before its result
    # (``coalesce.chunks`` stops taking at the stop flag), and its tokens.
    text: str = ""
    tokens: int = 0
    # The prompt's tokens as Triton's model counted them (0: the model does not say).
    prompt_tokens: int = 0
    # Set by Cancel or Preempt (a FinishReason value); the stream stops at once.
    stop_reason: int | None = None
    # The Triton stream, to cancel it.
    stream: TritonStream | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Slots:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"slots must be at least 1, got {total}")
        self.total = total
        self._running: dict[str, Execution] = {}

    @property
    def used(self) -> int:
        return len(self._running)

    def acquire(self, job_id: str, model: str) -> Execution:
        if job_id in self._running:
            raise DuplicateJob(job_id)
        if len(self._running) >= self.total:
            raise SlotsFull(job_id)
        execution = Execution(job_id, model)
        self._running[job_id] = execution
        return execution

    def get(self, job_id: str) -> Execution | None:
        return self._running.get(job_id)

    def release(self, execution: Execution) -> None:
        if self._running.get(execution.job_id) is execution:
            del self._running[execution.job_id]
        execution.done.set()
