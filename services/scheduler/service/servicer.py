"""The gRPC servicer: protobuf in, a call into the data plane, protobuf out.

Stateless: every request, job and worker lives in the data plane
(``dataplane.SchedulerService``) and the core under it. A status error is
aborted here, with the message the data plane or ``validation`` gives.

Admission refuses before anything is queued: a full queue and a tenant over its
share answer ``RESOURCE_EXHAUSTED`` at once, with the seconds to wait in the
message and as ``grpc-retry-pushback-ms`` trailing metadata (what gRPC's retry
policies honour); a deadline that cannot be met answers ``DEADLINE_EXCEEDED``
before ``Accepted`` (``dataplane.shed``). Each stream leaves its request when
its RPC ends (``streams.Subscription`` on the context's done callback), so a
client that goes away frees its slot at once unless it asked for a reattach
grace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.core.admission import TenantCapError
from services.scheduler.core.interface import QueueFullError
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.journal import Journal
from services.scheduler.service.streams import Request, Subscription, follow
from services.scheduler.service.tenancy import (
    Tenancy,
    differing_field,
    reuse_message,
    shown_id,
    unknown_message,
)
from services.scheduler.service.validation import reattach_grace, validate
from shortline.common.outcomes import OutcomeLog
from shortline.common.telemetry import tracer
from shortline.scheduler.v1 import internal_pb2, scheduler_pb2, scheduler_pb2_grpc

INTERNAL_SERVICE_NAME = internal_pb2.DESCRIPTOR.services_by_name[
    "SchedulerInternalService"
].full_name
# Trailing metadata gRPC clients' retry policies read as "retry after this many ms".
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
DRAINING_MESSAGE = (
    "the scheduler is draining (shutting down) and admits no new request; "
    "retry on another scheduler"
)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """The public API. Once ``draining`` (the server's SIGTERM), a new request is
    refused with UNAVAILABLE (the SDK retries it on another scheduler); a retry of a
    request this scheduler holds still attaches to it: refusing it would leave that
    request without a client, and a request without a client is cancelled."""

    draining = False

    def __init__(
        self,
        cfg: SchedulerConfig,
        outcome_log: OutcomeLog | None = None,
        tenancy: Tenancy | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.cfg = cfg
        # Named by the deprecated worker RPCs; the server sets the bound address.
        self.internal_address = f"{cfg.internal_host}:{cfg.internal_port}"
        # Every public RPC asks it first who calls (UNAUTHENTICATED without a token).
        self.tenancy = tenancy if tenancy is not None else Tenancy(cfg.tokens_file)
        self.plane = SchedulerService(cfg, outcome_log, journal)
        self._tracer = tracer("shortline.scheduler")

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        # One generator over ``follow``: every message of the stream passes each layer
        # (about a microsecond each), so the drain and the refusal count are here too.
        answered = False
        try:
            tenant = await self.tenancy.tenant(context)
            plane = self.plane
            if self.draining and plane.lookup(request.request_id, tenant.name) is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            workers, predictor = plane.workers, plane.predictor
            problem = validate(
                request, self.cfg, workers.limits(request.model), predictor.known_targets()
            )
            if problem is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            await self.tenancy.check_model(tenant, request.model, context)
            await self.tenancy.check_priority(tenant, request, context)
            await self.tenancy.check_length_hint(tenant, request, context)
            span = self._tracer.start_span(
                "scheduler.generate", attributes={"shortline.request_id": request.request_id}
            )
            try:
                # Current only while the request is admitted or attached (no yield in
                # between): the work done for it later joins this trace through the
                # context ``admit`` keeps. Left current across the yields below, it would
                # be detached in another context when gRPC drops the generator of a
                # cancelled call (an error with a traceback in the log for each client
                # that left).
                with trace.use_span(span):
                    req = await self._open(request, tenant.name, context, span)
                # The stream leaves the request when its RPC ends, however it ends.
                sub = Subscription(req, plane.disconnected)
                # (grpc-stubs types the callback as a class of its own; any callable is
                # taken.)
                context.add_done_callback(sub.end)  # type: ignore[arg-type]
                async for item in follow(sub):
                    # Only the end is ``req.final`` (a status or the result): one
                    # identity test per delta, nothing more.
                    if item is req.final:
                        if isinstance(item, tuple):
                            code, message = item
                            span.set_attribute("shortline.status", code.name)
                            await context.abort(code, message)
                        r = item.result
                        span.set_attributes(
                            {
                                "shortline.predicted_tokens": r.predicted_tokens,
                                "shortline.actual_tokens": r.actual_tokens,
                                "shortline.preemptions": r.preemptions,
                                "shortline.queue_wait_s": r.queue_wait_seconds,
                            }
                        )
                    answered = True
                    yield item
            finally:
                span.end()
        except grpc.aio.AbortError as exc:
            # Ended with a status before its first message: refused, counted by reason.
            if not answered:
                metrics.count_refusal(context.code(), exc)
            raise

    async def _open(
        self,
        request: scheduler_pb2.GenerateRequest,
        tenant: str,
        context: grpc.aio.ServicerContext,
        span: trace.Span,
    ) -> Request:
        """The request this stream follows: the tenant's live or finished one with this
        id, or a new one admitted now; aborts with the status that says why not."""
        plane = self.plane
        req = plane.lookup(request.request_id, tenant)
        if req is not None:
            differs = differing_field(req.fingerprint, request)
            if differs is not None:
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS, reuse_message(request.request_id, differs)
                )
            if req.job.finish_reason == "disconnected":
                await context.abort(grpc.StatusCode.ABORTED, _gone_message(req))
            span.set_attribute("shortline.attached", True)
            return req
        unserved = plane.workers.unserved(request.model)
        if unserved is not None:
            await context.abort(grpc.StatusCode.NOT_FOUND, unserved)
        try:
            req = plane.admit(request, context.time_remaining(), tenant)
        except (QueueFullError, TenantCapError) as exc:
            await self._refuse(str(exc), context)
            raise  # abort raises; this line is never reached
        req.reattach_grace_s = reattach_grace(request, self.cfg)
        return req

    async def _refuse(self, why: str, context: grpc.aio.ServicerContext) -> None:
        """RESOURCE_EXHAUSTED now, saying why and when a retry may pass."""
        retry_s = self.plane.admission.retry_after_s()
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{why}; the scheduler is at capacity, retry in about {retry_s:.2f} s",
            trailing_metadata=((RETRY_PUSHBACK_KEY, str(round(retry_s * 1000))),),
        )

    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CancelResponse:
        tenant = await self.tenancy.tenant(context)
        req = self.plane.lookup(request.request_id, tenant.name)
        if req is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_message(request.request_id))
        assert req is not None
        if not req.job.terminal:
            self.plane.cancel(req, "cancelled")
        return scheduler_pb2.CancelResponse(
            state=scheduler_pb2.RequestState.ValueType(int(req.job.state))
        )

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetStatsResponse:
        await self.tenancy.tenant(context)
        return stats_response(self.plane, with_addresses=False)

    async def ListModels(
        self, request: scheduler_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListModelsResponse:
        tenant = await self.tenancy.tenant(context)
        # Only what this tenant may use: the rest would only be PERMISSION_DENIED.
        served = [m for m in self.plane.workers.served() if tenant.may_use(m.model)]
        return scheduler_pb2.ListModelsResponse(
            models=[m.to_proto(scheduler_pb2.ModelLimits) for m in served],
            max_prompt_bytes=self.cfg.max_prompt_bytes,
        )

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, self._moved("RegisterWorker"))
        raise AssertionError("abort raises")

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, self._moved("Heartbeat"))
        raise AssertionError("abort raises")

    def _moved(self, rpc: str) -> str:
        return (
            f"{rpc} moved to {INTERNAL_SERVICE_NAME} on the scheduler's internal port "
            f"({self.internal_address}); upgrade the worker"
        )


def _gone_message(req: Request) -> str:
    """ABORTED's message for a retry of a request cancelled because its client left."""
    return (
        f"request {shown_id(req.id)} was cancelled when its last stream went away (it asked "
        "for no reattach_grace_seconds, or came back after it); send a new request_id, and "
        "set reattach_grace_seconds to keep a request through a reconnect"
    )


def stats_response(
    plane: SchedulerService, *, with_addresses: bool
) -> scheduler_pb2.GetStatsResponse:
    """GetStats' answer; worker addresses only for the internal port's callers."""
    s = plane.core.stats()
    now = plane.clock.now()
    pool = plane.workers
    return scheduler_pb2.GetStatsResponse(
        policy=s.policy,
        batching=s.batching,
        queue_depth=s.queue_depth,
        running=s.running,
        completed=s.completed,
        cancelled=s.cancelled,
        failed=s.failed,
        preemptions=s.preemptions,
        predictor_fallbacks=s.predictor_fallbacks,
        cache_hits=s.cache_hits,
        cache_lookups=s.cache_lookups,
        late_jobs=s.late_jobs,
        token_time_seconds=s.token_time_s,
        workers=[
            scheduler_pb2.WorkerStatus(
                worker_id=w.id,
                address=w.address if with_addresses else "",
                slots_total=w.slots,
                slots_used=pool.slots_used(w.id),
                # Registered workers are present; alive says whether one takes work
                # (False while it reports its Triton not ready).
                alive=w.serving,
                seconds_since_heartbeat=now - w.last_seen,
                models=sorted(w.models),
            )
            for w in pool
        ],
        accuracy=[
            scheduler_pb2.PredictionAccuracy(
                length_model=g.target,
                source=g.source,
                head=g.head,
                requests=g.requests,
                share=g.share,
                kendall_tau=g.kendall_tau,
                mae_tokens=g.mae_tokens,
                bucket_accuracy=g.bucket_accuracy,
                order_gain=g.order_gain,
                replayed_order_gain=g.replayed_order_gain,
            )
            for g in plane.results.refresh_accuracy()
        ],
    )
