"""The gRPC servicer: protobuf in, a call into the data plane, protobuf out.

Stateless: every request, job and worker lives in the data plane
(``dataplane.SchedulerService``) and the core under it. A status error is
aborted here, with the message the data plane or ``validation`` gives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.scheduler.config import SchedulerConfig
from services.scheduler.core.interface import QueueFullError
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.streams import follow
from services.scheduler.service.tenancy import (
    Tenancy,
    differing_field,
    reuse_message,
    unknown_message,
)
from services.scheduler.service.validation import validate
from shortline.common.outcomes import OutcomeLog
from shortline.common.telemetry import tracer
from shortline.scheduler.v1 import internal_pb2, scheduler_pb2, scheduler_pb2_grpc

INTERNAL_SERVICE_NAME = internal_pb2.DESCRIPTOR.services_by_name[
    "SchedulerInternalService"
].full_name


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(
        self,
        cfg: SchedulerConfig,
        outcome_log: OutcomeLog | None = None,
        tenancy: Tenancy | None = None,
    ) -> None:
        self.cfg = cfg
        # Named by the deprecated worker RPCs; the server sets the bound address.
        self.internal_address = f"{cfg.internal_host}:{cfg.internal_port}"
        # Every public RPC asks it first who calls (UNAUTHENTICATED without a token).
        self.tenancy = tenancy if tenancy is not None else Tenancy(cfg.tokens_file)
        self.plane = SchedulerService(cfg, outcome_log)
        self._tracer = tracer("shortline.scheduler")

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        tenant = await self.tenancy.tenant(context)
        workers, predictor = self.plane.workers, self.plane.predictor
        problem = validate(
            request, self.cfg, workers.limits(request.model), predictor.known_targets()
        )
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self.tenancy.check_model(tenant, request.model, context)
        plane = self.plane
        with self._tracer.start_as_current_span("scheduler.generate") as span:
            span.set_attribute("shortline.request_id", request.request_id)
            req = plane.lookup(request.request_id, tenant.name)
            if req is not None:
                differs = differing_field(req.fingerprint, request)
                if differs is not None:
                    await context.abort(
                        grpc.StatusCode.ALREADY_EXISTS, reuse_message(request.request_id, differs)
                    )
            if req is None:
                unserved = plane.workers.unserved(request.model)
                if unserved is not None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, unserved)
                try:
                    req = plane.admit(request, context.time_remaining(), tenant.name)
                except QueueFullError as exc:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                    raise  # abort raises; this line is never reached
            else:
                span.set_attribute("shortline.attached", True)
            async for item in follow(req, self.cfg.disconnect_grace_s, plane.disconnected):
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
                alive=True,
                seconds_since_heartbeat=now - w.last_seen,
                models=sorted(w.models),
            )
            for w in pool
        ],
    )
