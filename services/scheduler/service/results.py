"""How a request ends: its GenerateResult (or status), metrics and outcome-log row.

``Results.finalize`` runs once per request, whatever ended it (finished,
cancelled, deadline, failed): the data plane calls it for every job the core
ends (``dataplane._settle``), and a second call is a no-op. The finished record
stays in :class:`ResultStore` for ``result_ttl_s`` so that a retried
``request_id`` gets the same result instead of running again; the outcome log
(``shortline.common.outcomes``) is what the predictor later learns output
lengths from. Rows are flushed off the
event loop when the log says a batch is due, and otherwise at most
``FLUSH_AFTER_S`` after they were appended (the loop's timer asks
:meth:`Results.next_due`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from services.scheduler import metrics
from services.scheduler.core.accuracy import (
    NATURAL_ENDS,
    GroupAccuracy,
    OnlineAccuracy,
    ReplayWindow,
)
from services.scheduler.core.clock import Clock
from services.scheduler.core.job import Job, JobState
from services.scheduler.service.streams import Request
from services.scheduler.sim.replay import Deployment, Replay, replay_gains

if TYPE_CHECKING:
    from services.scheduler.core.admission import AdmissionControl
    from services.scheduler.core.scheduler import SchedulerCore
    from services.scheduler.service.journal import Journal
from services.scheduler.service.tenancy import shown_id
from shortline.common.outcomes import Outcome, OutcomeLog
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

FLUSH_AFTER_S = 1.0
# A finished record still streaming to a client when its TTL passed is looked at again
# this much later.
PRUNE_RECHECK_S = 1.0
# The online accuracy (tau over each target's window) is recomputed at most this often,
# and only after a request ended: about 1 ms per target of 500 requests.
ACCURACY_EVERY_S = 5.0
# The replayed order gain (services/scheduler/sim/replay.py) runs at most this often, in
# a thread: per target of 500 requests about 15 ms of simulation with one group, 50 ms
# with eight, during which the event loop's wake-ups wait up to a GIL switch (5 ms).
REPLAY_EVERY_S = 60.0

log = logging.getLogger(__name__)

SOURCES = {
    "predictor": scheduler_pb2.PREDICTION_SOURCE_PREDICTOR,
    "cache": scheduler_pb2.PREDICTION_SOURCE_CACHE,
    "fallback": scheduler_pb2.PREDICTION_SOURCE_FALLBACK,
    "oracle": scheduler_pb2.PREDICTION_SOURCE_ORACLE,
    "hint": scheduler_pb2.PREDICTION_SOURCE_HINT,
}
_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "deadline": common_pb2.FINISH_REASON_DEADLINE_EXCEEDED,
    "disconnected": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}

StatusError = tuple[grpc.StatusCode, str]


def prediction_source(job: Job) -> scheduler_pb2.PredictionSource.ValueType:
    return SOURCES.get(job.prediction_source, scheduler_pb2.PREDICTION_SOURCE_UNSPECIFIED)


# Finished records kept at most (about 13 KB each with their text): 130 MB.
MAX_RESULTS = 10_000


class ResultStore:
    """Finished requests by their scoped key (``job.id``: tenant and id), oldest
    first, kept ``ttl_s`` for retried ids."""

    def __init__(self, ttl_s: float, max_results: int = MAX_RESULTS) -> None:
        self.ttl_s = ttl_s
        self.max_results = max_results
        self._done: dict[str, Request] = {}  # insertion order = finishing order
        # Told each key the store lets go of (the journal deletes its rows).
        self.on_drop: Callable[[str], None] | None = None

    def add(self, req: Request) -> None:
        self._done[req.job.id] = req
        if len(self._done) > self.max_results:
            # Bounded whatever the TTL: the oldest unread record goes first.
            oldest = next((k for k, r in self._done.items() if not r.subscribers), None)
            if oldest is not None:
                self._drop(oldest)

    def _drop(self, key: str) -> None:
        del self._done[key]
        if self.on_drop is not None:
            self.on_drop(key)

    def get(self, key: str) -> Request | None:
        return self._done.get(key)

    def prune(self, now: float) -> None:
        """Drops records older than the TTL that no client stream still reads."""
        stale = []
        for rid, r in self._done.items():  # oldest first: stop at the first fresh one
            assert r.finished_at is not None
            if now - r.finished_at <= self.ttl_s:
                break
            if not r.subscribers:
                stale.append(rid)
        for rid in stale:
            self._drop(rid)

    def next_due(self, now: float) -> float | None:
        first = next(iter(self._done.values()), None)
        if first is None or first.finished_at is None:
            return None
        due = first.finished_at + self.ttl_s
        return due if due > now else now + PRUNE_RECHECK_S

    def __len__(self) -> int:
        return len(self._done)


class Results:
    def __init__(
        self,
        clock: Clock,
        policy_name: str,
        ttl_s: float,
        outcome_log: OutcomeLog | None,
        spawn: Callable[[Any], Any],
    ) -> None:
        self.clock = clock
        self.policy_name = policy_name
        self.store = ResultStore(ttl_s)
        self.outcome_log = outcome_log
        self._spawn = spawn
        self._flush_due: float | None = None
        # The admission journal keeps each outcome row until the outcome log has it.
        self.journal: Journal | None = None
        self._unlogged: list[str] = []
        # Ended requests the store does not keep: their journal rows go once logged.
        self._unkept: set[str] = set()
        self.accuracy = OnlineAccuracy()
        self._accuracy_due: float | None = None
        # The replay of the accuracy windows: what it serves on (``watch_deployment``),
        # when it is due, and no sooner than ``replay_every_s`` after the last one began.
        self._core: SchedulerCore | None = None
        self._admission: AdmissionControl | None = None
        self.replay_every_s = REPLAY_EVERY_S
        self._replay_due: float | None = None
        self._replay_allowed = -math.inf
        self._replaying = False
        self.last_replays: list[Replay] = []  # the last round's, one per target (its cost)

    def finalize(self, req: Request, error: StatusError | None = None) -> None:
        """Ends ``req`` once: its final message to every stream, metrics, outcome row."""
        if req.final is not None:
            return
        job = req.job
        now = self.clock.now()
        req.finished_at = now
        req.end_queue_span(left_queue_without_running=True)
        req.cancel_disconnect_timer()

        def since(t: float | None) -> float:
            return t - job.arrival if t is not None else math.nan

        reason = job.finish_reason or ("error" if error else "stop")
        if error is None and job.state is JobState.FAILED:
            error = (
                grpc.StatusCode.UNAVAILABLE,
                f"request {shown_id(req.id)} failed: its worker was lost or failed "
                f"{job.requeues} times; retry later",
            )
        if error is not None:
            req.final = error
        elif job.finish_reason == "deadline":
            req.final = (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {shown_id(req.id)}: deadline exceeded",
            )
        else:
            req.final = scheduler_pb2.GenerateResponse(
                result=scheduler_pb2.GenerateResult(
                    request_id=req.id,
                    finish_reason=_REASONS.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED),
                    queue_wait_seconds=max(0.0, since(job.first_dispatch)) or 0.0,
                    time_to_first_token_seconds=since(job.first_token)
                    if job.first_token is not None
                    else 0.0,
                    completion_seconds=since(job.finish or now),
                    predicted_tokens=job.predicted if not math.isnan(job.predicted) else 0.0,
                    actual_tokens=req.tokens,
                    preemptions=job.preemptions,
                    prediction_source=prediction_source(job),
                    worker_id=req.worker_id,
                    prompt_tokens=req.prompt_tokens,
                    head_version=req.head_version,
                )
            )
        if req.accepted is not None or error is None:
            self.store.add(req)
        else:
            # Refused before Accepted (shed): nothing to replay, and a retry may be
            # admitted once the queue is shorter. Kept, these records were most of the
            # scheduler's growth under sustained overload.
            if self.journal is not None:
                self._unkept.add(job.id)
        self._observe(req, reason, now, since)
        self._log(req, reason, now, since)
        req.changed()  # journaled, then sent to the streams
        if job.id in self._unkept and self.outcome_log is None:
            self._drop_journaled([job.id])
        # A retried id needs the text and timings, not the prompt (its fingerprint
        # answers ALREADY_EXISTS) or the embedding: under overload the kept results
        # are most of the scheduler's memory.
        job.prompt = ""
        job.embedding = None

    def interrupt(self, req: Request, why: str) -> None:
        """Ends every client stream of an unfinished request with UNAVAILABLE (the
        scheduler is stopping) without ending the request itself: no result, no
        outcome row, so that a scheduler that keeps its jobs across a restart can
        still finish it for a client that retries the same id."""
        if req.final is not None:
            return
        req.cancel_disconnect_timer()
        # Set so that a stream still waiting for the prediction ends too.
        req.final = (
            grpc.StatusCode.UNAVAILABLE,
            f"request {shown_id(req.id)}: {why}; retry with the same request id",
        )
        req.interrupted = True  # the journal keeps it live, for the next scheduler
        req.changed()

    def _observe(
        self, req: Request, reason: str, now: float, since: Callable[[float | None], float]
    ) -> None:
        job = req.job
        model = metrics.MODELS.label(job.model)
        labels = (self.policy_name, model)
        if job.first_dispatch is not None:
            metrics.QUEUE_WAIT.labels(*labels).observe(job.first_dispatch - job.arrival)
        if job.first_token is not None:
            metrics.TTFT.labels(*labels).observe(job.first_token - job.arrival)
        if job.state is JobState.DONE:
            metrics.COMPLETION.labels(*labels).observe(since(job.finish or now))
            if not math.isnan(job.predicted):
                length_model = metrics.LENGTH_MODELS.label(job.length_model)
                metrics.PREDICTION_ABS_ERROR.labels(length_model).observe(
                    abs(job.predicted - req.tokens)
                )
                if reason in NATURAL_ENDS:
                    # Per head version when the predictor named one, else per source.
                    source = job.prediction_source
                    head = req.head_version or source
                    run_s = job.finish - job.run_started if job.finish is not None else math.nan
                    self.accuracy.observe(
                        length_model,
                        source,
                        head,
                        job.predicted,
                        req.tokens,
                        arrival=job.arrival,
                        run_seconds=run_s,
                        run_tokens=req.tokens - job.run_start_generated,
                    )
                    if self._accuracy_due is None:
                        self._accuracy_due = now + ACCURACY_EVERY_S
                    if self._replay_due is None and self._core is not None:
                        self._replay_due = max(now + ACCURACY_EVERY_S, self._replay_allowed)
        metrics.REQUESTS.labels(model, reason).inc()

    def _log(
        self, req: Request, reason: str, now: float, since: Callable[[float | None], float]
    ) -> None:
        if self.outcome_log is None:
            return
        job = req.job
        outcome = Outcome(
            ts=time.time(),
            request_id=req.id,
            model=job.model,
            length_model=job.length_model,
            prompt=job.prompt,
            predicted_tokens=job.predicted,
            actual_tokens=req.tokens,
            queue_wait_s=since(job.first_dispatch),
            ttft_s=since(job.first_token),
            completion_s=since(job.finish or now),
            preemptions=job.preemptions,
            finish_reason=reason,
            prediction_source=job.prediction_source,
            # The predictor's embedding (kept in digest mode); None when the
            # request fell back.
            embedding=job.embedding,
        )
        if self.journal is not None:
            self.journal.outcome(req, outcome)
            self._unlogged.append(job.id)
        if self.outcome_log.append(outcome):
            self.flush()
        elif self._flush_due is None:
            self._flush_due = now + FLUSH_AFTER_S

    def flush(self) -> None:
        """Commits the buffered rows off the event loop (then the journal drops its
        copies of them)."""
        self._flush_due = None
        if self.outcome_log is not None:
            keys, self._unlogged = self._unlogged, []
            self._spawn(self._flush(self.outcome_log, keys))

    async def _flush(self, outcome_log: OutcomeLog, keys: list[str]) -> None:
        await asyncio.to_thread(outcome_log.flush)
        if self.journal is not None and keys:
            self.journal.logged(keys)
        self._drop_journaled([k for k in keys if k in self._unkept])

    def _drop_journaled(self, keys: list[str]) -> None:
        for key in keys:
            self._unkept.discard(key)
            if self.journal is not None:
                self.journal.forget(key)

    def refresh_accuracy(self) -> list[GroupAccuracy]:
        """The online accuracy now (recomputed if a request ended since), exported."""
        self._accuracy_due = None
        changed = self.accuracy.dirty
        groups = self.accuracy.compute()
        if changed:
            metrics.export_accuracy(groups)
        return groups

    def watch_deployment(self, core: SchedulerCore, admission: AdmissionControl) -> None:
        """Replays the accuracy windows on ``core``'s policy, batching and workers (the
        time per token from the window, else ``admission``'s): without this call, no
        replay."""
        self._core = core
        self._admission = admission

    def _deployment(self, window: ReplayWindow) -> Deployment | None:
        """The live deployment as the replay models it, or None without a worker or a
        time per token."""
        core, admission = self._core, self._admission
        if core is None or admission is None or not core.workers:
            return None
        token_s = window.token_time_s or admission.seconds_per_token()
        if not token_s > 0.0:
            return None
        workers = len(core.workers)
        slots = sum(w.slots for w in core.workers.values())
        per_worker = max(1, round(slots / workers))
        return Deployment(core.policy, core.batching, workers, per_worker, token_s)

    def _start_replay(self, now: float) -> None:
        """Copies the changed windows and replays them in a thread (never on the event
        loop: a few simulations per target); the figures land when it ends."""
        if self._replaying:
            self._replay_due = now + ACCURACY_EVERY_S
            return
        self._replay_due = None
        self._replay_allowed = now + self.replay_every_s
        work = [(w, d) for w in self.accuracy.replay_windows() if (d := self._deployment(w))]
        if work:
            self._replaying = True
            self._spawn(self._replay(work))

    async def _replay(self, work: list[tuple[ReplayWindow, Deployment]]) -> None:
        try:
            done = await asyncio.to_thread(_replay_all, work)
        except Exception:
            log.exception("replaying the accuracy windows failed")
            return
        finally:
            self._replaying = False
        self.last_replays = [r for _, r in done]
        for window, replay in done:
            gains = {key: replay.gains[i] for i, key in enumerate(window.groups)}
            self.accuracy.set_replayed(window.target, gains)
        metrics.export_accuracy(self.accuracy.compute())
        log.debug(
            "replayed %d accuracy windows in %.1f ms (%d simulations)",
            len(done),
            1e3 * sum(r.seconds for r in self.last_replays),
            sum(r.simulations for r in self.last_replays),
        )

    def on_timer(self, now: float) -> None:
        self.store.prune(now)
        if self._flush_due is not None and now >= self._flush_due:
            self.flush()
        if self._accuracy_due is not None and now >= self._accuracy_due:
            self.refresh_accuracy()
        if self._replay_due is not None and now >= self._replay_due:
            self._start_replay(now)

    def next_due(self, now: float) -> float | None:
        """When :meth:`on_timer` has work: a record's TTL, a buffered row's flush, the
        accuracy's recomputation, its replay."""
        due = (self.store.next_due(now), self._flush_due, self._accuracy_due, self._replay_due)
        times = [t for t in due if t is not None]
        return min(times) if times else None


def _replay_all(work: list[tuple[ReplayWindow, Deployment]]) -> list[tuple[ReplayWindow, Replay]]:
    """Every window's replay (run in a thread: reads only its copies)."""
    return [
        (w, replay_gains(w.arrival, w.predicted, w.actual, w.codes, len(w.groups), d))
        for w, d in work
    ]
