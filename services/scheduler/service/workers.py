"""The worker pool: handles, runs on workers, stops, heartbeat expiry.

A worker's handle (its channel, stub, last heartbeat and running streams)
hangs off the core's record of the worker (``core.workers[id].attachment``):
the core's table of workers is the one registry of workers. A run is one
``Execute`` stream; its deltas (on the worker's ``StreamDeltas`` stream when
open, ``delta_stream``, else on ``Execute``) go to the request's record
(``streams.Request``) and its end to the core.

A worker is present and serving, present but not serving, or gone. Each
heartbeat says whether it serves (its Triton is ready); a worker that does not
is kept in the pool but the core places nothing on it (``set_accepting``), and
dispatch to it resumes when it serves again: no drop, no re-registration, and
its jobs are not disturbed. A run that breaks with UNAVAILABLE or CANCELLED
(its Triton died, or the worker did) is requeued to resume elsewhere from the
text the client already has; the worker is taken out of dispatch and asked
``GetCapacity`` at once: if it answers, it stays (serving or not, as it says);
if not, it is gone and the rest of its jobs are requeued as well. A worker that
misses ``MISSED_HEARTBEATS`` heartbeats in a row is gone too.

A job the core ends on any of these paths (done, or failed once its retries
are spent) is ended for its clients by the data plane, from the core's list of
ended jobs, not here: nothing here decides whether a client gets its answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.core.clock import Clock
from services.scheduler.core.interface import Stop
from services.scheduler.core.job import JobState
from services.scheduler.core.membership import MembershipInterface
from services.scheduler.service.chat import messages_of
from services.scheduler.service.delta_stream import (
    DeltasLost,
    DeltaStream,
    RunSink,
    applier,
    lost_in_transit,
)
from services.scheduler.service.results import StatusError
from services.scheduler.service.streams import Request
from services.scheduler.service.tenancy import shown_id
from services.scheduler.service.validation import ServedLimits
from shortline.common import tls
from shortline.common.limits import ModelLimits, narrowest
from shortline.common.telemetry import tracer
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

MISSED_HEARTBEATS = 3
# How long a worker whose run broke has to answer GetCapacity before it is gone.
PROBE_TIMEOUT_S = 2.0

Spawn = Callable[[Coroutine[Any, Any, Any], Request | None], "asyncio.Task[Any]"]


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
    # What it advertised per model (defaults for a model it gave none for).
    limits: dict[str, ModelLimits] = field(default_factory=dict)
    # The models it formats chat messages for (``ModelLimits.chat``; none from old workers).
    chat: frozenset[str] = frozenset()
    # Its last word on whether it can serve (heartbeat, GetCapacity); dispatch follows it.
    serving: bool = True
    probe: asyncio.Task[None] | None = None
    # Its StreamDeltas stream (runs' deltas, several a message) and the task keeping it.
    deltas: DeltaStream | None = None
    deltas_task: asyncio.Task[None] | None = None


class WorkerPool:
    def __init__(
        self,
        core: MembershipInterface,
        clock: Clock,
        cfg: SchedulerConfig,
        spawn: Spawn,
        finalize: Callable[[Request, StatusError | None], None],
        pump: Callable[[], None],
    ) -> None:
        self.core = core
        self.clock = clock
        self.cfg = cfg
        self._spawn = spawn
        self._finalize = finalize
        self._pump = pump
        self._tls = tls.load(cfg)
        self._tracer = tracer("shortline.scheduler")
        # limits() per model, asked by every Generate; changes only when workers do.
        self._limits: dict[str, ServedLimits] = {}

    # ---- the registry (the core's) -------------------------------------------

    def get(self, worker_id: str) -> WorkerHandle | None:
        w = self.core.workers.get(worker_id)
        return None if w is None else w.attachment

    def __iter__(self) -> Iterator[WorkerHandle]:
        return (w.attachment for w in list(self.core.workers.values()))

    def __len__(self) -> int:
        return len(self.core.workers)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self.core.workers

    def slots_used(self, worker_id: str) -> int:
        w = self.core.workers.get(worker_id)
        return w.used if w is not None else 0

    def unserved(self, model: str) -> str | None:
        """Why no worker serves ``model`` (NOT_FOUND's message); None when one does or
        no worker has joined yet."""
        handles = list(self)
        if not handles or any(model in w.models for w in handles):
            return None
        served = sorted({m for w in handles for m in w.models})
        return f"model {model!r} is not served by any worker (served: {', '.join(served)})"

    def limits(self, model: str) -> ServedLimits:
        """What a request for ``model`` must fit: the most restrictive limits of the
        workers serving it, chat messages only if every one of them formats them.
        Before any worker has joined (a request may queue then), or for a model no
        worker serves (``unserved`` refuses it), the defaults."""
        cached = self._limits.get(model)
        if cached is not None:
            return cached
        serving = [w for w in self if model in w.limits]
        narrowed = narrowest(model, (w.limits[model] for w in serving))
        chat = all(model in w.chat for w in serving)
        limits = ServedLimits(**asdict(narrowed), chat=chat)
        if len(self._limits) < 1024:  # bounded: names come from requests
            self._limits[model] = limits
        return limits

    def served(self) -> list[ServedLimits]:
        """Each served model's limits (ListModels), by name."""
        return [self.limits(m) for m in sorted({m for w in self for m in w.models})]

    def mismatch(self, worker_id: str, models: list[str]) -> str | None:
        """Why a joining worker does not fit this pool (FAILED_PRECONDITION's message)."""
        pool = {w.models for w in self if w.id != worker_id}
        if not pool or frozenset(models) in pool:
            return None
        # Placement does not look at models: one scheduler serves one model pool.
        served = ", ".join(sorted(next(iter(pool))))
        return (
            f"worker {worker_id} serves models [{', '.join(sorted(models))}]"
            f" but this scheduler's pool serves [{served}]; run one scheduler per model pool"
        )

    # ---- membership ----------------------------------------------------------

    def register(
        self,
        worker_id: str,
        address: str,
        slots: int,
        models: list[str],
        limits: Iterable[scheduler_pb2.ModelLimits] = (),
    ) -> None:
        if worker_id in self:
            # Registered again (restarted): whatever it ran before is gone.
            self.lost(worker_id)
        # With mutual TLS the worker must also prove it is ``worker_id`` when called:
        # its certificate has to name it, whatever host its address points at.
        # A channel of its own (local subchannel pool): a worker restarted at the same
        # address must not share gRPC's global connection to it, still in reconnect
        # backoff from the dead process.
        options: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]
        if self._tls.mutual:
            options.append(("grpc.ssl_target_name_override", worker_id))
        channel = tls.aio_channel(address, self._tls, options)
        handle = WorkerHandle(
            id=worker_id,
            address=address,
            slots=slots,
            models=frozenset(models),
            channel=channel,
            stub=worker_pb2_grpc.WorkerServiceStub(channel),
            last_seen=self.clock.now(),
            limits=model_limits(models, limits),
            chat=frozenset(m.model for m in limits if m.chat and m.model in models),
        )
        self.core.add_worker(worker_id, slots, handle)
        self._limits.clear()
        handle.deltas = DeltaStream(worker_id, handle.stub)
        handle.deltas_task = self._spawn(handle.deltas.run(), None)
        metrics.MODELS.add(models)
        metrics.WORKERS_ALIVE.set(len(self))
        log.info(
            "worker %s joined: %s, %d slots, models %s",
            worker_id,
            address,
            slots,
            ", ".join(models),
        )
        self._pump()

    def heartbeat(self, worker_id: str, serving: bool = True) -> bool:
        worker = self.get(worker_id)
        if worker is None:
            return False
        worker.last_seen = self.clock.now()
        self.set_serving(worker, serving)
        return True

    def set_serving(self, worker: WorkerHandle, serving: bool, why: str = "") -> None:
        """Follows a present worker's word on whether it can serve: the core stops or
        resumes placing jobs on it; what runs there is left alone."""
        if self.get(worker.id) is not worker:
            return  # gone (or replaced) meanwhile
        worker.serving = serving
        if not self.core.set_accepting(worker.id, serving):
            return
        if serving:
            log.info("worker %s serves again; dispatching to it", worker.id)
            self._pump()
        else:
            log.warning(
                "worker %s is not serving%s; no new jobs go to it until it is",
                worker.id,
                f" ({why})" if why else "",
            )

    @property
    def _limit(self) -> float:
        return MISSED_HEARTBEATS * self.cfg.heartbeat_interval_s

    def expire(self, now: float) -> None:
        """Declares lost every worker silent for more than MISSED_HEARTBEATS intervals."""
        limit = self._limit
        for w in list(self):
            if now - w.last_seen > limit:
                log.warning("worker %s missed %d heartbeats", w.id, MISSED_HEARTBEATS)
                self.lost(w.id)

    def next_expiry(self) -> float | None:
        """When the quietest worker would be declared lost (a heartbeat moves it later)."""
        seen = [w.last_seen for w in self]
        return min(seen) + self._limit if seen else None

    def lost(self, worker_id: str) -> None:
        worker = self.get(worker_id)
        if worker is None:
            return
        # Jobs its core record holds that retries cannot save end (FAILED) in the core's
        # list of ended jobs; the data plane ends their streams when this pumps.
        requeued = self.core.on_worker_lost(worker_id)
        self._limits.clear()
        for task in worker.runs.values():
            task.cancel()
        worker.runs.clear()
        if worker.probe is not None:
            worker.probe.cancel()
        if worker.deltas_task is not None:
            worker.deltas_task.cancel()
        self._spawn(worker.channel.close(None), None)
        metrics.WORKERS_ALIVE.set(len(self))
        log.warning(
            "worker %s lost: %d running jobs requeued to resume elsewhere", worker_id, len(requeued)
        )
        self._pump()

    def _suspect(self, worker: WorkerHandle, why: str) -> None:
        """A run on ``worker`` broke as if it were down: nothing more goes to it until
        it answers GetCapacity (then it stays, serving or not as it says) or fails to
        (then it is gone)."""
        self.set_serving(worker, False, why)
        if worker.probe is None and self.get(worker.id) is worker:
            worker.probe = self._spawn(self._probe(worker), None)

    async def _probe(self, worker: WorkerHandle) -> None:
        try:
            reply = await worker.stub.GetCapacity(
                worker_pb2.GetCapacityRequest(), timeout=PROBE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            worker.probe = None
            if self.get(worker.id) is worker:
                log.warning("worker %s does not answer (%s)", worker.id, exc.code().name)
                self.lost(worker.id)
            return
        worker.probe = None
        self.set_serving(worker, reply.serving, "its Triton is not ready")

    async def close(self) -> None:
        for w in list(self):
            await w.channel.close(None)

    # ---- runs ----------------------------------------------------------------

    def start(self, req: Request, worker_id: str) -> None:
        """Runs ``req``'s job on the worker (the core assigned it), from its text so far."""
        job = req.job
        worker = self.get(worker_id)
        assert worker is not None
        # Random per run: the worker learns nothing of the request id or its tenant,
        # and a run's key is never reused, so a late Cancel cannot hit a later run.
        key = req.run_key = secrets.token_hex(12)
        req.end_queue_span(queue_depth_at_dispatch=self.core.queue_depth, worker_id=worker.id)
        worker.runs[job.id] = self._spawn(self._run(req, worker, job.run_token, key), req)

    def stop(self, stop: Stop) -> None:
        worker = self.get(stop.worker_id)
        if worker is None:
            return
        req: Request = stop.job.attachment
        # The core stops the run it knows as current, which is the last one started.
        self._spawn(self._send_stop(worker, req.run_key, stop.preempt), req)

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

        messages = messages_of(req)
        if messages and job.model not in worker.chat:
            worker.runs.pop(job.id, None)
            if current():
                self._no_chat(req, worker)
                self._pump()
            return

        # Attributes given at the start: validated in one pass, not under the span's
        # lock one by one.
        attributes: dict[str, Any] = {
            "shortline.request_id": req.id,
            "shortline.model": job.model,
            "shortline.target_model": job.length_model,
            "shortline.preemptions": job.preemptions,
            "shortline.worker_id": worker.id,
            "shortline.resume_tokens": req.tokens,
            "shortline.predicted_tokens": job.predicted,
        }
        if req.accepted is not None:
            attributes["shortline.queue_position"] = req.accepted.queue_position
        span = self._tracer.start_span("scheduler.run", attributes=attributes)
        token_ctx = otel_context.attach(trace.set_span_in_context(span))
        fresh = req.tokens == 0  # this run's input is the prompt alone
        # The run's series, looked up once: labels() takes a lock and builds a key
        # (about 1 us of the ~1.3 us a per-message lookup and inc cost).
        generated = metrics.GENERATED_TOKENS.labels(metrics.MODELS.label(job.model))
        apply = applier(req, token, worker.id, self.core.on_progress, generated.inc)
        stream = worker.deltas
        sink: RunSink | None = stream.attach(key, apply) if stream is not None else None
        try:
            call = worker.stub.Execute(
                worker_pb2.ExecuteRequest(
                    job_id=key,
                    model=job.model,
                    # A chat request sends its messages (the job's prompt is the
                    # predictor's text), which the worker formats with the template.
                    prompt="" if messages else job.prompt,
                    messages=messages,
                    max_tokens=job.max_tokens - req.tokens,
                    sampling=req.sampling,
                    resume_text=req.text,
                    resume_tokens=req.tokens,
                    delta_stream=stream.stream_id if sink is not None and stream else "",
                )
            )
            if sink is not None:
                sink.call = call
            async for msg in call:
                if not current():
                    call.cancel()
                    return
                if msg.HasField("delta"):
                    apply(msg.delta)
                else:
                    result = msg.result
                    if result.streamed_deltas and sink is not None:
                        await sink.caught_up(result.streamed_deltas)
                    reason = result.finish_reason
                    req.worker_id = result.worker_id or worker.id
                    if fresh and result.prompt_tokens:
                        req.prompt_tokens = result.prompt_tokens
        except (asyncio.CancelledError, DeltasLost) as exc:
            if not lost_in_transit(sink, exc):
                return  # the worker was declared lost; the core has requeued the job
            if current():  # resumes from the deltas applied, as a run that broke
                self._run_broke(req, worker, grpc.StatusCode.UNAVAILABLE, repr(exc))
            self._pump()
            return
        except grpc.aio.AioRpcError as exc:
            if not current():
                return
            self._run_broke(req, worker, exc.code(), exc.details() or "")
            self._pump()
            return
        finally:
            if sink is not None and stream is not None:
                stream.detach(key, sink)
            if worker.runs.get(job.id) is asyncio.current_task():
                del worker.runs[job.id]
            span.set_attribute("shortline.tokens", req.tokens)
            span.end()
            otel_context.detach(token_ctx)
        if current():
            self._run_ended(req, reason)
        self._pump()

    def _no_chat(self, req: Request, worker: WorkerHandle) -> None:
        """A chat job placed on a worker that would not format it (it joined after the
        request was admitted and predates chat messages, or serves the model raw): not
        sent, since an old worker would ignore the messages and run an empty prompt.
        Requeued for another worker; FAILED_PRECONDITION once its requeues are spent."""
        job = req.job
        why = (
            f"worker {worker.id} does not format chat messages for model {job.model!r} "
            "(it predates them, or serves the model with the raw format)"
        )
        log.warning("job %s: %s", job.id, why)
        self.core.on_run_failed(job.id, req.tokens)
        if job.terminal:
            status = grpc.StatusCode.FAILED_PRECONDITION
            self._finalize(req, (status, f"request {shown_id(req.id)}: {why}"))

    def _run_broke(
        self, req: Request, worker: WorkerHandle, code: grpc.StatusCode, details: str
    ) -> None:
        job = req.job
        log.warning("job %s on %s: %s %s", job.id, worker.id, code.name, details)
        worker.runs.pop(job.id, None)
        down = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        retry = code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        self.core.on_run_failed(job.id, req.tokens, retry=retry)
        if job.terminal:
            # CANCELLED here is the worker's doing, not the client's: say UNAVAILABLE.
            told = grpc.StatusCode.UNAVAILABLE if down else code
            self._finalize(req, (told, f"request {shown_id(req.id)}: {details}"))
        if down:
            self._suspect(worker, f"{code.name}: {details}")

    def _run_ended(self, req: Request, reason: int | None) -> None:
        job = req.job
        finished = reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
        if job.state is JobState.CANCELLED:
            self.core.on_stopped(job.id, req.tokens)
        elif finished:
            # Also when a preemption arrived too late: the job is simply done (and
            # its result sent by the data plane, as for every job the core ends).
            name = "length" if reason == common_pb2.FINISH_REASON_LENGTH else "stop"
            self.core.on_finish(job.id, name, req.tokens)
        elif job.state is JobState.PREEMPTED:
            self.core.on_stopped(job.id, req.tokens)
        else:
            # Stopped without being asked (worker shutting down, error): resume elsewhere.
            self.core.on_run_failed(job.id, req.tokens)
            if job.terminal:
                why = f"request {shown_id(req.id)}: its workers kept ending it without a result"
                self._finalize(req, (grpc.StatusCode.UNAVAILABLE, why))


def model_limits(
    models: list[str], advertised: Iterable[scheduler_pb2.ModelLimits]
) -> dict[str, ModelLimits]:
    """A joining worker's limits per served model, within the outer bounds; limits for
    a model it does not serve are ignored, a served model without any gets defaults."""
    given = {m.model: ModelLimits.from_proto(m) for m in advertised}
    return {m: given.get(m, ModelLimits(m)) for m in models}
