"""The scheduler's data plane: what every front (today the gRPC servicer) calls.

Everything that decides (order, placement, preemption, admission, requeue)
lives in the core; this module admits requests, applies the core's decisions
through the worker pool and ends requests through ``results``.

One registry each: a live request's record (``streams.Request``) hangs off the
core's job (``job.attachment``) and a worker's handle off the core's worker
(``core.workers[id].attachment``), so the service keeps no table beside the
core's; a finished record moves to ``results.ResultStore`` for retried ids.
Of the alternatives (a service table keyed like the core's, kept in step with
it), this one cannot drift: when the core forgets a job, the service has no
copy left to forget.

Timers come from the core, not a polling tick: one ``loop.call_later`` handle
is armed for the earliest of ``core.next_timer()`` (deadlines, the dynamic
batching window), the next heartbeat expiry, the next result-TTL prune and the
outcome log's flush, and re-armed after every event that can move them
(``_pump`` runs after each). The one thing no timer predicts is a guard of
ssjf-aging (wait bound, latest start) changing which queued job is best, and
with it whether a preemption pays: for a preempting ssjf-aging, while every
slot is busy and jobs wait, the timer also fires every ``GUARD_POLL_S`` as the
old 50 ms tick did.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

import grpc

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig, build_bands, build_policy
from services.scheduler.core.admission import AdmissionControl
from services.scheduler.core.batching import Batching
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.fallback import FallbackPredictor
from services.scheduler.core.interface import Assign, Decision, Stop
from services.scheduler.core.job import Job
from services.scheduler.core.scheduler import SOURCE_HINT, SOURCE_PREDICTOR, SchedulerCore
from services.scheduler.service.chat import ChatRequest, copy_messages
from services.scheduler.service.clock import MonotonicClock
from services.scheduler.service.journal import Journal
from services.scheduler.service.prediction import Prediction, PredictorClient
from services.scheduler.service.restore import restore
from services.scheduler.service.results import Results, StatusError, prediction_source
from services.scheduler.service.streams import Request
from services.scheduler.service.tenancy import fingerprint, scoped_key, shown_id
from services.scheduler.service.validation import predictor_text
from services.scheduler.service.workers import WorkerPool
from shortline.common.outcomes import OutcomeLog
from shortline.common.telemetry import tracer
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

log = logging.getLogger(__name__)

GUARD_POLL_S = 0.05
# Never sleep less than this: a timer fires at its time or a hair before it, and a
# condition checked with ">" (heartbeats) is only true strictly after.
MIN_DELAY_S = 0.001
# How long a registration waits for the predictor's first list of heads (it is asked
# at start; a worker that joins at once must still have its head targets checked).
HEADS_WAIT_S = 2.0


class SchedulerService:
    def __init__(
        self,
        cfg: SchedulerConfig,
        outcome_log: OutcomeLog | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = MonotonicClock()
        self.policy = build_policy(cfg)
        self.core = SchedulerCore(
            self.policy,
            Batching.parse(cfg.batching, cfg.slots, cfg.batch_wait_ms / 1e3),
            self.clock,
            queue_limit=cfg.queue_limit,
            cache=SemanticCache(cfg.cache_threshold, cfg.cache_size) if cfg.predictor else None,
            fallback=FallbackPredictor(cfg.fallback_tokens),
            cap_at_max_tokens=not cfg.benchmark_mode,
            bands=build_bands(cfg),
        )
        # Every job the core ends, on any path, is listed here and ended for its
        # clients in ``_settle``: no client is left waiting on a job the core forgot.
        self.core.ended = []
        # Tenant caps and deadline shedding, from the core's knowledge (queue, token time).
        self.admission = AdmissionControl(
            self.core,
            tenant_share=cfg.tenant_queue_share,
            deadline_margin=cfg.deadline_shed_margin,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self.results = Results(
            self.clock, self.policy.name, cfg.result_ttl_s, outcome_log, self._spawn_plain
        )
        # The online accuracy's windows replayed on this core's policy and workers.
        self.results.watch_deployment(self.core, self.admission)
        # Write-ahead: a request's news reaches its streams once journaled (``journal``).
        self.journal = journal
        if journal is not None:
            self.results.journal = journal
            self.results.store.on_drop = journal.forget
        self.workers = WorkerPool(
            self.core, self.clock, cfg, self._spawn, self._finalize, self._pump
        )
        self.predictor = PredictorClient(cfg)
        self._late_seen = 0  # ssjf-aging's late jobs already counted in Prometheus
        self._tracer = tracer("shortline.scheduler")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._started = False
        policy = self.policy
        self._guard_polls = policy.preemption is not None and (
            policy.wait_bound is not None or policy.jct_target is not None
        )

    # ---- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Takes back what the journal holds, then serves."""
        if self.journal is not None:
            restore(self, self.journal, self.journal.load(self.cfg.result_ttl_s))
        self._started = True
        self.predictor.known_targets()  # asks the predictor for its heads, in the background
        self._arm()

    async def close(self) -> None:
        self._started = False
        # Every open stream gets a status now rather than a reset later (or nothing);
        # the journal keeps the requests for the next start.
        self.interrupt(
            [j.attachment for j in self.core if j.attachment is not None],
            "the scheduler is shutting down",
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.workers.close()
        await self.predictor.close()
        if self.results.outcome_log is not None:
            await asyncio.to_thread(self.results.outcome_log.flush)
        if self.journal is not None:
            self.journal.close()

    def interrupt(self, reqs: list[Request], why: str) -> None:
        """Ends the streams of unfinished requests with UNAVAILABLE, keeping the requests
        (journaled: a restarted scheduler continues them for clients that retry)."""
        if self.journal is not None:
            self.journal.commit()  # what was generated reaches the streams first
        for req in reqs:
            self.results.interrupt(req, why)
        if self.journal is not None:
            self.journal.commit()

    def _spawn(self, coro: Coroutine[Any, Any, Any], req: Request | None) -> asyncio.Task[Any]:
        ctx = req.trace_context.copy() if req is not None and req.trace_context else None
        task = asyncio.create_task(coro, context=ctx)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_plain(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._spawn(coro, None)

    # ---- timers --------------------------------------------------------------

    def _next_due(self) -> float | None:
        now = self.clock.now()
        times = [
            t
            for t in (
                self.core.next_timer(),
                self.workers.next_expiry(),
                self.results.next_due(now),
            )
            if t is not None
        ]
        if (
            self._guard_polls
            and len(self.core.queue)
            and not self.core.free_slots
            and self.core.running
        ):
            times.append(now + GUARD_POLL_S)
        return min(times) if times else None

    def _arm(self) -> None:
        """(Re)arms the one timer for the earliest time something is due.

        Only ever moves the wake-up earlier: one that comes too early finds nothing
        due and re-arms, and a poll that is re-armed on every event still fires."""
        if not self._started:
            return
        due = self._next_due()
        if due is None:
            return
        if self._timer is not None:
            assert self._timer_at is not None
            if self._timer_at <= due:
                return  # an earlier wake-up is armed; it re-arms after it runs
            self._timer.cancel()
        self._timer_at = due
        delay = max(due - self.clock.now(), MIN_DELAY_S)
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            now = self.clock.now()
            self.workers.expire(now)
            for _, stop in self.core.expire():  # ended in _settle
                if stop is not None:
                    self.workers.stop(stop)
            self.results.on_timer(now)
            self._pump()
        except Exception:
            log.exception("scheduler timer failed")
        finally:
            self._arm()

    # ---- requests ------------------------------------------------------------

    def lookup(self, request_id: str, tenant: str = "") -> Request | None:
        """The tenant's live or recently finished request with this id (another
        tenant's is not found)."""
        key = scoped_key(tenant, request_id)
        job = self.core.get(key)
        if job is not None and job.attachment is not None:
            req: Request = job.attachment
            return req
        return self.results.store.get(key)

    def length_model(self, request: scheduler_pb2.GenerateRequest) -> str:
        """The head a request is predicted with: its own; else its model's, as the
        workers serving it map it (their --length-models); else --default-length-model."""
        served = self.workers.limits(request.model).length_model
        return request.length_model or served or self.cfg.default_length_model

    async def head_targets(self) -> frozenset[str] | None:
        """The predictor's heads; None with no predictor, or when it has not answered
        within ``HEADS_WAIT_S`` (then nothing can be checked against them)."""
        targets = self.predictor.known_targets()
        if targets is not None or not self.cfg.predictor:
            return targets
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEADS_WAIT_S
        while targets is None and loop.time() < deadline:
            await asyncio.sleep(GUARD_POLL_S)
            targets = self.predictor.known_targets()
        return targets

    def admit(
        self,
        request: scheduler_pb2.GenerateRequest,
        remaining: float | None,
        tenant: str = "",
    ) -> Request:
        """Queues a new request (awaiting its prediction); raises QueueFullError, or
        TenantCapError when ``tenant`` already holds its share of the queue."""
        self.admission.check_tenant(tenant)
        now = self.clock.now()
        job = Job(
            scoped_key(tenant, request.request_id),
            arrival=now,
            model=request.model,
            length_model=self.length_model(request),
            prompt=predictor_text(request),
            max_tokens=request.max_tokens,
            true_tokens=request.max_tokens if self.policy.uses_truth else None,
            deadline=now + remaining if remaining is not None else None,
            # Absent = band 0; the tenant's max_priority was checked before (tenancy).
            priority=request.priority if request.HasField("priority") else 0,
            tenant=tenant,
        )
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        kept = fingerprint(request)
        req: Request
        if request.messages:
            chat = copy_messages(request.messages)
            req = ChatRequest(request.request_id, job, sampling, tenant, kept, messages=chat)
        else:
            req = Request(request.request_id, job, sampling, tenant=tenant, fingerprint=kept)
        job.attachment = req
        self.core.submit(job)  # QueueFullError: nothing was kept
        self.admission.admitted(tenant, job)
        if self.journal is not None:
            self.journal.track(req)
        # Work done for this request later (prediction, runs on workers) joins the
        # caller's trace, whichever event happens to trigger it.
        req.trace_context = contextvars.copy_context()
        hint = float(request.length_hint) if request.HasField("length_hint") else None
        self.predict_later(req, hint)
        return req

    def predict_later(self, req: Request, hint: float | None = None) -> None:
        """Asks the predictor for ``req`` in the background (queued on its answer); a
        request's own ``length_hint`` is its prediction (checked: tenancy)."""
        self._spawn(self._predict(req, hint), req)
        self._arm()

    async def _predict(self, req: Request, hint: float | None = None) -> None:
        job = req.job
        cache = self.core.cache
        outcome_log = self.results.outcome_log
        # A digest-mode outcome log keeps the embedding in place of the prompt.
        log_embedding = outcome_log is not None and outcome_log.wants_embeddings
        source = SOURCE_PREDICTOR
        if hint is not None:
            # No predictor call and no cache lookup: the caller's estimate is the one
            # used (online accuracy keeps hints apart, by their source).
            got, source = Prediction(hint, None), SOURCE_HINT
        else:
            try:
                got = await self.predictor.predict(
                    job, want_embedding=cache is not None or log_embedding
                )
            except Exception:  # a bad answer must not leave the job waiting for a prediction
                log.exception("prediction for %s failed; falling back", job.id)
                got = Prediction(None, None)
        lookups = cache.lookups if cache else 0
        hits = cache.hits if cache else 0
        if (
            self.core.on_prediction(job.id, got.tokens, source, got.embedding, got.quantiles)
            is None
        ):
            return  # cancelled while we were predicting
        if log_embedding and job.embedding is None:
            job.embedding = got.embedding  # the core keeps it only for its cache
        if job.prediction_source == SOURCE_PREDICTOR:
            req.head_version = got.head_version  # online accuracy is kept per head
        if cache is not None:
            metrics.CACHE_LOOKUPS.inc(cache.lookups - lookups)
            metrics.CACHE_HITS.inc(cache.hits - hits)
        problem = self.admission.deadline_problem(job, self.clock.now())
        if problem is not None:
            self.shed(req, problem)
            return
        req.accepted = scheduler_pb2.Accepted(
            request_id=req.id,
            predicted_tokens=job.predicted,
            prediction_source=prediction_source(job),
            queue_position=self.core.position(job),
            head_version=req.head_version,
        )
        if job.first_dispatch is None and req.final is None:
            req.queue_span = self._tracer.start_span("scheduler.queue")
            req.queue_span.set_attribute("shortline.request_id", req.id)
            req.queue_span.set_attribute("shortline.queue_position", req.accepted.queue_position)
            req.queue_span.set_attribute("shortline.predicted_tokens", job.predicted)
        req.changed()  # journaled, then its streams get Accepted
        self._pump()

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        stop = self.core.on_cancel(req.job.id, reason)
        if stop is not None:
            self.workers.stop(stop)
        self._pump()  # ends the request (_settle)

    def disconnected(self, req: Request) -> None:
        """Every client stream of an unfinished request went away (after the grace)."""
        log.info("request %s: every client stream went away; cancelling", req.job.id)
        self.cancel(req, "disconnected")

    def shed(self, req: Request, why: str) -> None:
        """Refuses a request before its Accepted: its deadline cannot be met.

        DEADLINE_EXCEEDED (not RESOURCE_EXHAUSTED): it is the status the caller would
        get at its deadline, now without the wait, and a retry with the same budget
        is refused again while the queue is as long; a full queue is
        RESOURCE_EXHAUSTED with a retry hint, since there a retry soon may pass."""
        self.core.on_cancel(req.job.id, "shed")  # sets the reason the outcome row shows
        status = (grpc.StatusCode.DEADLINE_EXCEEDED, f"request {shown_id(req.id)}: {why}")
        self._finalize(req, status)
        self._pump()

    def _finalize(self, req: Request, error: StatusError | None = None) -> None:
        if req.final is None:
            self.admission.observe_finished(req.job)
        self.results.finalize(req, error)
        if isinstance(req, ChatRequest):
            # As the job's prompt: a retried id needs the result, not the conversation.
            req.messages = ()

    # ---- dispatch ------------------------------------------------------------

    def _settle(self) -> None:
        """Ends, for its clients, every job the core ended since the last call: finished,
        cancelled, past its deadline, failed with a lost worker or with its retries
        spent. One place, after every event (each ends with ``_pump``), so no path or
        order of tasks can leave a client waiting on a job the core no longer has.
        ``finalize`` runs once per request: a path that already ended it with a more
        precise status is not overridden."""
        ended = self.core.ended
        assert ended is not None
        while ended:
            job = ended.pop(0)
            if job.attachment is not None:
                self._finalize(job.attachment)

    def _pump(self) -> None:
        for decision in self.core.dispatch():
            self._apply(decision)
        self._settle()
        metrics.QUEUE_DEPTH.set(self.core.queue_depth)
        metrics.RUNNING_JOBS.set(self.core.running)
        queue = self.core.queue
        late = queue.late_jobs
        if late > self._late_seen:
            metrics.AGING_LATE_JOBS.inc(late - self._late_seen)
            self._late_seen = late
        metrics.AGING_TOKEN_TIME.set(queue.token_time_s)
        self._arm()

    def _apply(self, decision: Decision) -> None:
        if isinstance(decision, Assign):
            job = decision.job
            req: Request = job.attachment
            if req.tokens >= job.max_tokens:
                # Preempted right at its last token: nothing left to run.
                self.core.on_finish(job.id, "length", req.tokens)
                self._finalize(req)
                return
            self.workers.start(req, decision.worker_id)
            req.changed()  # the journal keeps its first dispatch and counts
        else:
            assert isinstance(decision, Stop)
            if decision.preempt:
                metrics.PREEMPTIONS.inc()
            self.workers.stop(decision)
