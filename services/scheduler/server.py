"""The scheduler service: a thin grpc.aio shell over SchedulerCore.

Everything that decides (order, placement, preemption, admission, requeue)
lives in the core; this file moves bytes. A request's text is accumulated
here as the worker streams it, so a job resumed on another worker (after a
preemption or a lost worker) continues from exactly what the client already
has: ``resume_text``/``resume_tokens`` carry it, and the client sees one
stream. A retried ``request_id`` attaches to the same job (it gets the text
so far, then the rest) and never runs it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.core.batching import Batching
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.clock import MonotonicClock
from services.scheduler.core.fallback import FallbackPredictor
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.policies import Policy, PolicySettings
from services.scheduler.core.queue import SlackQueue
from services.scheduler.core.scheduler import (
    Assign,
    Decision,
    QueueFullError,
    SchedulerCore,
    Stop,
)
from shortline.common import grpc_server, paths, prometheus
from shortline.common.outcomes import Outcome, OutcomeLog
from shortline.common.telemetry import tracer
from shortline.common.v1 import common_pb2
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
MAX_REQUEST_ID = 128
MAX_TOKENS = 8192
MISSED_HEARTBEATS = 3
TICK_S = 0.05

_SOURCES = {
    "predictor": scheduler_pb2.PREDICTION_SOURCE_PREDICTOR,
    "cache": scheduler_pb2.PREDICTION_SOURCE_CACHE,
    "fallback": scheduler_pb2.PREDICTION_SOURCE_FALLBACK,
    "oracle": scheduler_pb2.PREDICTION_SOURCE_ORACLE,
}
_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "deadline": common_pb2.FINISH_REASON_DEADLINE_EXCEEDED,
    "disconnected": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}


@dataclass(eq=False)
class WorkerHandle:
    id: str
    address: str
    slots: int
    models: frozenset[str]
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceAsyncStub
    last_seen: float
    runs: dict[str, asyncio.Task[None]] = field(default_factory=dict)


@dataclass(eq=False)
class Request:
    """The service's side of a job: the streamed text and the client streams."""

    id: str
    job: Job
    sampling: common_pb2.SamplingParams
    text: str = ""
    tokens: int = 0
    subscribers: set[asyncio.Queue[Any]] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: scheduler_pb2.Accepted | None = None
    final: Any = None  # GenerateResponse (result) or (StatusCode, message)
    finished_at: float | None = None
    worker_id: str = ""
    disconnect_timer: asyncio.TimerHandle | None = None
    trace_context: contextvars.Context | None = None
    # Open from the moment the job is queued with its prediction until its
    # first dispatch, so a trace shows the time spent waiting.
    queue_span: trace.Span | None = None

    def end_queue_span(self, **attributes: Any) -> None:
        if self.queue_span is None:
            return
        for name, value in attributes.items():
            self.queue_span.set_attribute(f"shortline.{name}", value)
        self.queue_span.end()
        self.queue_span = None

    def broadcast(self, item: Any) -> None:
        for q in self.subscribers:
            q.put_nowait(item)


def validate(request: scheduler_pb2.GenerateRequest) -> str | None:
    """What is wrong with the request, naming the field; None when it is valid."""
    if not 1 <= len(request.request_id) <= MAX_REQUEST_ID:
        return f"request_id must be 1..{MAX_REQUEST_ID} characters, got {len(request.request_id)}"
    if not request.model:
        return "model must not be empty"
    if not request.prompt:
        return "prompt must not be empty"
    if not 1 <= request.max_tokens <= MAX_TOKENS:
        return f"max_tokens must be 1..{MAX_TOKENS}, got {request.max_tokens}"
    return None


def build_policy(cfg: SchedulerConfig) -> Policy:
    return PolicySettings.of(cfg).policy(cfg.policy, allow_oracle=cfg.benchmark_mode)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, cfg: SchedulerConfig, outcome_log: OutcomeLog | None = None) -> None:
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
        )
        self.outcome_log = outcome_log
        self._late_seen = 0  # ssjf-aging's late jobs already counted in Prometheus
        self.workers: dict[str, WorkerHandle] = {}
        self.requests: dict[str, Request] = {}
        self._predictor_channel: grpc.aio.Channel | None = None
        self._predictor: predictor_pb2_grpc.PredictorServiceAsyncStub | None = None
        if cfg.predictor:
            self._predictor_channel = grpc.aio.insecure_channel(cfg.predictor)
            self._predictor = predictor_pb2_grpc.PredictorServiceStub(self._predictor_channel)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._tracer = tracer("shortline.scheduler")
        self.predictor_errors = 0

    # ---- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for w in list(self.workers.values()):
            await w.channel.close(None)
        if self._predictor_channel is not None:
            await self._predictor_channel.close(None)
        if self.outcome_log is not None:
            await asyncio.to_thread(self.outcome_log.flush)

    def _spawn(self, coro: Any, req: Request | None = None) -> asyncio.Task[Any]:
        ctx = req.trace_context.copy() if req is not None and req.trace_context else None
        task = asyncio.create_task(coro, context=ctx)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick_forever(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            try:
                now = self.clock.now()
                limit = MISSED_HEARTBEATS * self.cfg.heartbeat_interval_s
                for w in list(self.workers.values()):
                    if now - w.last_seen > limit:
                        log.warning("worker %s missed %d heartbeats", w.id, MISSED_HEARTBEATS)
                        self._worker_lost(w.id)
                for job, stop in self.core.expire():
                    if stop is not None:
                        self._stop_on_worker(stop)
                    req = self.requests.get(job.id)
                    if req is not None:
                        self._finalize(req)
                self._prune(now)
                self._pump()
                if self.outcome_log is not None and time.monotonic() - last_flush > 1.0:
                    last_flush = time.monotonic()
                    await asyncio.to_thread(self.outcome_log.flush)
            except Exception:
                log.exception("scheduler tick failed")

    def _prune(self, now: float) -> None:
        ttl = self.cfg.result_ttl_s
        stale = [
            rid
            for rid, r in self.requests.items()
            if r.finished_at is not None and now - r.finished_at > ttl and not r.subscribers
        ]
        for rid in stale:
            del self.requests[rid]

    # ---- Generate ------------------------------------------------------------

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        problem = validate(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self._tracer.start_as_current_span("scheduler.generate") as span:
            span.set_attribute("shortline.request_id", request.request_id)
            req = self.requests.get(request.request_id)
            if req is None:
                if self.workers and not any(
                    request.model in w.models for w in self.workers.values()
                ):
                    served = sorted({m for w in self.workers.values() for m in w.models})
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f"model {request.model!r} is not served by any worker "
                        f"(served: {', '.join(served)})",
                    )
                admitted = self._admit(request, context.time_remaining())
                if isinstance(admitted, QueueFullError):
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(admitted))
                assert isinstance(admitted, Request)
                req = admitted
                # Work done for this request later (prediction, runs on workers) joins
                # this trace, whichever event happens to trigger it.
                req.trace_context = contextvars.copy_context()
                self._spawn(self._predict(req), req)
            else:
                span.set_attribute("shortline.attached", True)
            async for item in self._follow(req):
                if isinstance(item, tuple):
                    code, message = item
                    await context.abort(code, message)
                if item.HasField("result"):
                    r = item.result
                    span.set_attribute("shortline.predicted_tokens", r.predicted_tokens)
                    span.set_attribute("shortline.actual_tokens", r.actual_tokens)
                    span.set_attribute("shortline.preemptions", r.preemptions)
                    span.set_attribute("shortline.queue_wait_s", r.queue_wait_seconds)
                yield item

    def _admit(
        self, request: scheduler_pb2.GenerateRequest, remaining: float | None
    ) -> Request | QueueFullError:
        now = self.clock.now()
        job = Job(
            request.request_id,
            arrival=now,
            model=request.model,
            length_model=request.length_model or self.cfg.default_length_model,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            true_tokens=request.max_tokens if self.policy.uses_truth else None,
            deadline=now + remaining if remaining is not None else None,
        )
        try:
            self.core.submit(job)
        except QueueFullError as exc:
            return exc
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        req = Request(request.request_id, job, sampling)
        self.requests[req.id] = req
        return req

    async def _predict(self, req: Request) -> None:
        job = req.job
        predicted: float | None = None
        source = "predictor"
        embedding: list[float] | None = None
        if self._predictor is not None:
            started = time.perf_counter()
            with self._tracer.start_as_current_span("scheduler.predict") as span:
                try:
                    reply = await self._predictor.Predict(
                        predictor_pb2.PredictRequest(
                            target_model=job.length_model,
                            prompts=[job.prompt],
                            return_embedding=self.core.cache is not None,
                        ),
                        timeout=self.cfg.predictor_timeout_ms / 1e3,
                    )
                    p = reply.predictions[0]
                    predicted = p.predicted_tokens / self.cfg.prediction_scale
                    embedding = list(p.embedding) or None
                    span.set_attribute("shortline.predicted_tokens", predicted)
                except grpc.aio.AioRpcError as exc:
                    self.predictor_errors += 1
                    span.set_attribute("shortline.predictor_error", exc.code().name)
                    log.debug("predictor failed for %s: %s", req.id, exc.code().name)
            metrics.PREDICTOR_LATENCY.observe(time.perf_counter() - started)
        if predicted is None:
            metrics.PREDICTOR_FALLBACKS.labels(job.length_model).inc()
        lookups = self.core.cache.lookups if self.core.cache else 0
        hits = self.core.cache.hits if self.core.cache else 0
        if self.core.on_prediction(job.id, predicted, source, embedding) is None:
            return  # cancelled while we were predicting
        if self.core.cache is not None:
            metrics.CACHE_LOOKUPS.inc(self.core.cache.lookups - lookups)
            metrics.CACHE_HITS.inc(self.core.cache.hits - hits)
        req.accepted = scheduler_pb2.Accepted(
            request_id=req.id,
            predicted_tokens=job.predicted,
            prediction_source=_SOURCES.get(
                job.prediction_source, scheduler_pb2.PREDICTION_SOURCE_UNSPECIFIED
            ),
            queue_position=self.core.position(job),
        )
        if job.first_dispatch is None and req.final is None:
            req.queue_span = self._tracer.start_span("scheduler.queue")
            req.queue_span.set_attribute("shortline.request_id", req.id)
            req.queue_span.set_attribute("shortline.queue_position", req.accepted.queue_position)
            req.queue_span.set_attribute("shortline.predicted_tokens", job.predicted)
        req.ready.set()
        self._pump()

    async def _follow(self, req: Request) -> AsyncIterator[Any]:
        """One client stream: Accepted, the text so far, live deltas, the result."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if req.disconnect_timer is not None:
            req.disconnect_timer.cancel()
            req.disconnect_timer = None
        req.subscribers.add(queue)
        try:
            if not req.ready.is_set() and req.final is None:
                await req.ready.wait()
            if isinstance(req.final, tuple) and req.accepted is None:
                yield req.final
                return
            # No await between the snapshot and the live deltas that follow it.
            text, tokens = req.text, req.tokens
            while not queue.empty():
                queue.get_nowait()
            if req.accepted is not None:
                yield scheduler_pb2.GenerateResponse(accepted=req.accepted)
            if text:
                yield scheduler_pb2.GenerateResponse(
                    delta=scheduler_pb2.TextDelta(text=text, tokens=tokens)
                )
            if req.final is not None:
                # Finished before or while we caught up: the snapshot is the whole text.
                text_now = req.text[len(text) :]
                if text_now:
                    yield scheduler_pb2.GenerateResponse(
                        delta=scheduler_pb2.TextDelta(text=text_now, tokens=req.tokens - tokens)
                    )
                yield req.final
                return
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, tuple) or item.HasField("result"):
                    return
        finally:
            req.subscribers.discard(queue)
            if not req.subscribers and req.final is None:
                loop = asyncio.get_running_loop()
                req.disconnect_timer = loop.call_later(
                    self.cfg.disconnect_grace_s, self._disconnected, req
                )

    def _disconnected(self, req: Request) -> None:
        req.disconnect_timer = None
        if req.subscribers or req.final is not None:
            return
        log.info("request %s: every client stream went away; cancelling", req.id)
        self._cancel(req, "disconnected")

    # ---- running jobs on workers ---------------------------------------------

    def _pump(self) -> None:
        for decision in self.core.dispatch():
            self._apply(decision)
        metrics.QUEUE_DEPTH.set(self.core.queue_depth)
        metrics.RUNNING_JOBS.set(self.core.running)
        queue = self.core.queue
        if isinstance(queue, SlackQueue):
            if queue.turned_late > self._late_seen:
                metrics.AGING_LATE_JOBS.inc(queue.turned_late - self._late_seen)
                self._late_seen = queue.turned_late
            metrics.AGING_TOKEN_TIME.set(queue.token_time.value)

    def _apply(self, decision: Decision) -> None:
        if isinstance(decision, Assign):
            job = decision.job
            req = self.requests[job.id]
            worker = self.workers[decision.worker_id]
            if req.tokens >= job.max_tokens:
                # Preempted right at its last token: nothing left to run.
                self.core.on_finish(job.id, "length", req.tokens)
                self._finalize(req)
                return
            key = f"{job.id}.{job.run_token}"
            req.end_queue_span(queue_depth_at_dispatch=self.core.queue_depth, worker_id=worker.id)
            worker.runs[job.id] = self._spawn(self._run(req, worker, job.run_token, key), req)
        else:
            if decision.preempt:
                metrics.PREEMPTIONS.inc()
            self._stop_on_worker(decision)

    def _stop_on_worker(self, stop: Stop) -> None:
        worker = self.workers.get(stop.worker_id)
        if worker is None:
            return
        key = f"{stop.job.id}.{stop.job.run_token}"
        self._spawn(self._send_stop(worker, key, stop.preempt), self.requests.get(stop.job.id))

    async def _send_stop(self, worker: WorkerHandle, key: str, preempt: bool) -> None:
        try:
            if preempt:
                await worker.stub.Preempt(worker_pb2.PreemptRequest(job_id=key), timeout=10.0)
            else:
                await worker.stub.Cancel(worker_pb2.CancelRequest(job_id=key), timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            # NOT_FOUND: it ended on its own; its Execute stream says how.
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("stopping %s on %s: %s", key, worker.id, exc.code().name)

    async def _run(self, req: Request, worker: WorkerHandle, token: int, key: str) -> None:
        job = req.job
        reason: int | None = None

        def current() -> bool:
            return job.run_token == token and job.worker == worker.id

        span = self._tracer.start_span("scheduler.run")
        span.set_attribute("shortline.request_id", req.id)
        span.set_attribute("shortline.model", job.model)
        span.set_attribute("shortline.target_model", job.length_model)
        if req.accepted is not None:
            span.set_attribute("shortline.queue_position", req.accepted.queue_position)
        span.set_attribute("shortline.preemptions", job.preemptions)
        span.set_attribute("shortline.worker_id", worker.id)
        span.set_attribute("shortline.resume_tokens", req.tokens)
        span.set_attribute("shortline.predicted_tokens", job.predicted)
        token_ctx = otel_context.attach(trace.set_span_in_context(span))
        try:
            call = worker.stub.Execute(
                worker_pb2.ExecuteRequest(
                    job_id=key,
                    model=job.model,
                    prompt=job.prompt,
                    max_tokens=job.max_tokens - req.tokens,
                    sampling=req.sampling,
                    resume_text=req.text,
                    resume_tokens=req.tokens,
                )
            )
            async for msg in call:
                if not current():
                    call.cancel()
                    return
                if msg.HasField("delta"):
                    d = msg.delta
                    if job.state is JobState.CANCELLED:
                        continue
                    req.text += d.text
                    req.tokens += d.tokens
                    self.core.on_progress(job.id, req.tokens)
                    req.broadcast(
                        scheduler_pb2.GenerateResponse(
                            delta=scheduler_pb2.TextDelta(text=d.text, tokens=d.tokens)
                        )
                    )
                    metrics.GENERATED_TOKENS.labels(job.model).inc(d.tokens)
                else:
                    reason = msg.result.finish_reason
                    req.worker_id = msg.result.worker_id or worker.id
        except asyncio.CancelledError:
            return  # the worker was declared lost; the core has requeued the job
        except grpc.aio.AioRpcError as exc:
            if not current():
                return
            code = exc.code()
            log.warning("job %s on %s: %s %s", job.id, worker.id, code.name, exc.details())
            worker.runs.pop(job.id, None)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                self._worker_lost(worker.id)
            else:
                retry = code not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                )
                self.core.on_run_failed(job.id, req.tokens, retry=retry)
                if job.terminal:
                    self._finalize(req, (code, f"request {job.id}: {exc.details()}"))
            self._pump()
            return
        finally:
            if worker.runs.get(job.id) is asyncio.current_task():
                del worker.runs[job.id]
            span.set_attribute("shortline.tokens", req.tokens)
            span.end()
            otel_context.detach(token_ctx)
        if current():
            self._run_ended(req, reason)
        self._pump()

    def _run_ended(self, req: Request, reason: int | None) -> None:
        job = req.job
        finished = reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
        if job.state is JobState.CANCELLED:
            self.core.on_stopped(job.id, req.tokens)
        elif finished:
            # Also when a preemption arrived too late: the job is simply done.
            name = "length" if reason == common_pb2.FINISH_REASON_LENGTH else "stop"
            self.core.on_finish(job.id, name, req.tokens)
            self._finalize(req)
        elif job.state is JobState.PREEMPTED:
            self.core.on_stopped(job.id, req.tokens)
        else:
            # Stopped without being asked (worker shutting down, error): resume elsewhere.
            self.core.on_run_failed(job.id, req.tokens)
            if job.terminal:
                self._finalize(req, (grpc.StatusCode.UNAVAILABLE, f"request {job.id} failed"))

    def _worker_lost(self, worker_id: str) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        on_it = [self.requests[j] for j in list(worker.runs) if j in self.requests]
        requeued = self.core.on_worker_lost(worker_id)
        for task in worker.runs.values():
            task.cancel()
        worker.runs.clear()
        self._spawn(worker.channel.close(None))
        metrics.WORKERS_ALIVE.set(len(self.workers))
        log.warning(
            "worker %s lost: %d running jobs requeued to resume elsewhere", worker_id, len(requeued)
        )
        for req in on_it:
            if req.job.state is JobState.FAILED:
                self._finalize(
                    req, (grpc.StatusCode.UNAVAILABLE, f"request {req.id}: workers kept failing")
                )
        self._pump()

    # ---- endings ---------------------------------------------------------------

    def _finalize(self, req: Request, error: tuple[grpc.StatusCode, str] | None = None) -> None:
        if req.final is not None:
            return
        job = req.job
        now = self.clock.now()
        req.finished_at = now
        req.end_queue_span(left_queue_without_running=True)
        if req.disconnect_timer is not None:
            req.disconnect_timer.cancel()
            req.disconnect_timer = None

        def since(t: float | None) -> float:
            return t - job.arrival if t is not None else math.nan

        reason = job.finish_reason or ("error" if error else "stop")
        if error is not None:
            req.final = error
        elif job.finish_reason == "deadline":
            req.final = (grpc.StatusCode.DEADLINE_EXCEEDED, f"request {req.id}: deadline exceeded")
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
                    prediction_source=_SOURCES.get(
                        job.prediction_source, scheduler_pb2.PREDICTION_SOURCE_UNSPECIFIED
                    ),
                    worker_id=req.worker_id,
                )
            )
        req.ready.set()
        req.broadcast(req.final)
        labels = (self.policy.name, job.model)
        if job.first_dispatch is not None:
            metrics.QUEUE_WAIT.labels(*labels).observe(job.first_dispatch - job.arrival)
        if job.first_token is not None:
            metrics.TTFT.labels(*labels).observe(job.first_token - job.arrival)
        if job.state is JobState.DONE:
            metrics.COMPLETION.labels(*labels).observe(since(job.finish or now))
            if not math.isnan(job.predicted):
                metrics.PREDICTION_ABS_ERROR.labels(job.length_model).observe(
                    abs(job.predicted - req.tokens)
                )
        metrics.REQUESTS.labels(job.model, reason).inc()
        if self.outcome_log is not None:
            due = self.outcome_log.append(
                Outcome(
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
                )
            )
            if due:
                self._spawn(asyncio.to_thread(self.outcome_log.flush))

    def _cancel(self, req: Request, reason: str) -> None:
        stop = self.core.on_cancel(req.id, reason)
        if stop is not None:
            self._stop_on_worker(stop)
        if req.job.terminal:
            self._finalize(req)
        self._pump()

    # ---- other RPCs ------------------------------------------------------------

    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CancelResponse:
        req = self.requests.get(request.request_id)
        if req is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"request_id {request.request_id!r} is not known"
            )
        assert req is not None
        if not req.job.terminal:
            self._cancel(req, "cancelled")
        return scheduler_pb2.CancelResponse(
            state=scheduler_pb2.RequestState.ValueType(int(req.job.state))
        )

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetStatsResponse:
        s = self.core.stats()
        now = self.clock.now()
        core_workers = self.core.workers
        return scheduler_pb2.GetStatsResponse(
            policy=s["policy"],
            batching=s["batching"],
            queue_depth=s["queue_depth"],
            running=s["running"],
            completed=s["completed"],
            cancelled=s["cancelled"],
            failed=s["failed"],
            preemptions=s["preemptions"],
            predictor_fallbacks=s["predictor_fallbacks"],
            cache_hits=s["cache_hits"],
            cache_lookups=s["cache_lookups"],
            late_jobs=s["late_jobs"],
            token_time_seconds=s["token_time_s"],
            workers=[
                scheduler_pb2.WorkerStatus(
                    worker_id=w.id,
                    address=w.address,
                    slots_total=w.slots,
                    slots_used=core_workers[w.id].used if w.id in core_workers else 0,
                    alive=True,
                    seconds_since_heartbeat=now - w.last_seen,
                    models=sorted(w.models),
                )
                for w in self.workers.values()
            ],
        )

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        if not request.worker_id or not request.address:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "worker_id and address must not be empty"
            )
        if request.slots < 1:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"slots must be >= 1, got {request.slots}"
            )
        pool = {w.models for wid, w in self.workers.items() if wid != request.worker_id}
        if pool and frozenset(request.models) not in pool:
            # Placement does not look at models: one scheduler serves one model pool.
            served = ", ".join(sorted(next(iter(pool))))
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {request.worker_id} serves models [{', '.join(sorted(request.models))}]"
                f" but this scheduler's pool serves [{served}]; run one scheduler per model pool",
            )
        if request.worker_id in self.workers:
            # Registered again (restarted): whatever it ran before is gone.
            self._worker_lost(request.worker_id)
        channel = grpc.aio.insecure_channel(request.address)
        self.workers[request.worker_id] = WorkerHandle(
            id=request.worker_id,
            address=request.address,
            slots=request.slots,
            models=frozenset(request.models),
            channel=channel,
            stub=worker_pb2_grpc.WorkerServiceStub(channel),
            last_seen=self.clock.now(),
        )
        self.core.add_worker(request.worker_id, request.slots)
        metrics.WORKERS_ALIVE.set(len(self.workers))
        log.info(
            "worker %s joined: %s, %d slots, models %s",
            request.worker_id,
            request.address,
            request.slots,
            ", ".join(request.models),
        )
        self._pump()
        return scheduler_pb2.RegisterWorkerResponse(
            heartbeat_interval_seconds=self.cfg.heartbeat_interval_s
        )

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        worker = self.workers.get(request.worker_id)
        if worker is None:
            return scheduler_pb2.HeartbeatResponse(known=False)
        worker.last_seen = self.clock.now()
        return scheduler_pb2.HeartbeatResponse(known=True)


class SchedulerServer:
    """The servicer inside a gRPC server with health and reflection."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        log_path = Path(cfg.outcome_log) if cfg.outcome_log else paths.run_dir() / "outcomes.sqlite"
        self.outcome_log = OutcomeLog(log_path)
        self.servicer = SchedulerServicer(cfg, self.outcome_log)
        self.address = f"{cfg.host}:{cfg.port}"
        self.server, self.health = grpc_server.build_server(
            lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self.servicer, s),
            [SERVICE_NAME],
            self.address,
        )

    async def start(self) -> None:
        await self.server.start()
        self.servicer.start()
        await grpc_server.set_serving(self.health, [SERVICE_NAME], True)
        log.info(
            "scheduler on %s: policy %s, batching %s, queue limit %d, predictor %s, log %s",
            self.address,
            self.cfg.policy,
            self.cfg.batching,
            self.cfg.queue_limit,
            self.cfg.predictor or "none (fallback only)",
            self.outcome_log.path,
        )

    async def stop(self, grace_s: float = 2.0) -> None:
        await grpc_server.set_serving(self.health, [SERVICE_NAME], False)
        await self.server.stop(grace_s)
        await self.servicer.close()
        await asyncio.to_thread(self.outcome_log.close)


async def serve(cfg: SchedulerConfig) -> None:
    from shortline.common.telemetry import setup_tracing

    setup_tracing("scheduler")
    prometheus.start_metrics_server(cfg.metrics_port, cfg.host)
    server = SchedulerServer(cfg)
    await server.start()
    await grpc_server.run_until_signal(server.server, on_stop=server.servicer.close)
    await asyncio.to_thread(server.outcome_log.close)
