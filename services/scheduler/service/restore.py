"""A restarted scheduler takes back what its journal holds (``journal.Journal.load``).

Live requests go back into the core as they were: original arrival (so aging
and queue order treat them as the old requests they are), deadline, prediction
and the text already delivered; a running one is queued again and resumes on a
worker from the prompt plus that text, as after a lost worker. Their clients
are gone with the old process: each request waits ``restart_reattach_s`` (or
its own reattach grace, if longer) for a stream to reattach with its id, and is
cancelled if none does, as a request whose client left. Finished requests
within the result TTL go back into the result store, so a retried id still
gets its result, and outcome rows the outcome log may have missed are appended
to it (those it already has are recognised, not written twice).

Journal times are wall-clock; the core's are monotonic. Each is moved by the
time elapsed since it was written (``now_mono - (now_wall - t)``).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from services.scheduler.config import SchedulerConfig
from services.scheduler.core.admission import AdmissionControl
from services.scheduler.core.clock import Clock
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.policies import Policy
from services.scheduler.core.scheduler import SchedulerCore
from services.scheduler.service import chat
from services.scheduler.service.chat import ChatRequest
from services.scheduler.service.journal import Journal, Mark, meta_of
from services.scheduler.service.journal_rows import Loaded, Record
from services.scheduler.service.results import Results, prediction_source
from services.scheduler.service.streams import Request, await_reattach
from shortline.common.outcomes import OutcomeLog
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

log = logging.getLogger(__name__)


class Plane(Protocol):
    """What a restore puts requests back into (``dataplane.SchedulerService``)."""

    @property
    def cfg(self) -> SchedulerConfig: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def core(self) -> SchedulerCore: ...
    @property
    def admission(self) -> AdmissionControl: ...
    @property
    def results(self) -> Results: ...

    def predict_later(self, req: Request) -> None: ...
    def disconnected(self, req: Request) -> None: ...


def restore(plane: Plane, journal: Journal, loaded: Loaded) -> None:
    """Puts ``loaded`` back into ``plane`` (before it serves anything)."""
    mono = Shift(plane.clock.now(), time.time())
    for record in loaded.finished:
        req = _request(record, mono)
        req.job.state = JobState(record.state or JobState.DONE)
        req.job.finish_reason = record.finish_reason
        req.final, req.final_shown = record.final, True
        req.finished_at = mono(record.finished)
        req.ready.set()
        journal.track(req, _held(req, record))
        plane.results.store.add(req)
    for record in loaded.live:
        _live(plane, journal, record, mono)
    if loaded.live or loaded.finished:
        log.info(
            "journal %s: %d unfinished requests back in the queue (waiting up to %g s for "
            "their clients), %d finished results kept",
            journal.path,
            len(loaded.live),
            plane.cfg.restart_reattach_s,
            len(loaded.finished),
        )
    if loaded.unlogged and plane.results.outcome_log is not None:
        _log_missing(plane.results.outcome_log, journal, loaded)


class Shift:
    """Wall-clock journal times to the monotonic clock, by the time since they were written."""

    def __init__(self, now_mono: float, now_wall: float) -> None:
        self.offset = now_mono - now_wall

    def at(self, t: float) -> float:
        return t + self.offset

    def __call__(self, t: float | None) -> float | None:
        return None if t is None else t + self.offset


def _request(record: Record, mono: Shift) -> Request:
    job = Job(
        record.key,
        arrival=mono.at(record.arrival),
        model=record.model,
        length_model=record.length_model,
        prompt=record.prompt,
        max_tokens=record.max_tokens,
        deadline=mono(record.deadline),
        priority=record.priority,  # its band, as admitted
        tenant=record.tenant,
    )
    job.first_dispatch = mono(record.first_dispatch)
    job.first_token = mono(record.first_token)
    job.preemptions = record.preemptions
    job.requeues = record.requeues
    job.generated = job.run_start_generated = record.tokens
    # A chat request resumes with its conversation, which the worker formats again.
    cls = ChatRequest if record.messages else Request
    req = cls(
        record.request_id,
        job,
        common_pb2.SamplingParams.FromString(record.sampling),
        tenant=record.tenant,
        fingerprint=record.fingerprint,
        text=record.text,
        tokens=record.tokens,
        shown=len(record.text),
        shown_tokens=record.tokens,
        worker_id=record.worker_id,
        reattach_grace_s=record.reattach_grace,
    )
    if isinstance(req, ChatRequest):
        req.messages = chat.from_json(record.messages)
    job.attachment = req
    return req


def _held(req: Request, record: Record) -> Mark:
    """The journal's mark for a reloaded request: all of it is in the file."""
    return Mark(
        admitted=True,
        chars=len(req.text),
        tokens=req.tokens,
        predicted=record.predicted is not None,
        meta=meta_of(req),
        final=record.final is not None,
    )


def _live(plane: Plane, journal: Journal, record: Record, mono: Shift) -> None:
    req = _request(record, mono)
    job = req.job
    if plane.policy.uses_truth:
        job.true_tokens = job.max_tokens
    plane.core.submit(job, readmit=True)
    plane.admission.admitted(record.tenant, job)
    journal.track(req, _held(req, record))
    if record.predicted is not None:
        plane.core.on_prediction(job.id, record.predicted, record.source or "predictor")
        req.accepted = scheduler_pb2.Accepted(
            request_id=req.id,
            predicted_tokens=job.predicted,
            prediction_source=prediction_source(job),
            queue_position=plane.core.position(job),
        )
        req.ready.set()
    else:
        plane.predict_later(req)
    grace = max(req.reattach_grace_s, plane.cfg.restart_reattach_s)
    await_reattach(req, grace, plane.disconnected)


def _log_missing(outcome_log: OutcomeLog, journal: Journal, loaded: Loaded) -> None:
    """Appends the outcome rows the log does not have (the old process died before its
    flush), recognising the ones it has by request id and completion time."""
    have = outcome_log.recent_keys(len(loaded.unlogged) * 4 + 1000)
    missing = [
        r.outcome
        for r in loaded.unlogged
        if r.outcome is not None and (r.outcome.request_id, r.outcome.ts) not in have
    ]
    for outcome in missing:
        outcome_log.append(outcome)
    outcome_log.flush()
    journal.logged([r.key for r in loaded.unlogged])
    if missing:
        log.info("outcome log: %d rows the previous process had not written added", len(missing))
