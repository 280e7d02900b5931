"""The internal API's servicer (``SchedulerInternalService``): workers join and beat,
operators read the pool with addresses.

Served on its own port, apart from the public one, so that a client with a
token can never register a worker. With mutual TLS a worker may register or
beat only under its certificate's name, so no one can take a registered id.
"""

from __future__ import annotations

import grpc

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.servicer import stats_response
from services.scheduler.service.validation import validate_registration
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2


class SchedulerInternalServicer(internal_pb2_grpc.SchedulerInternalServiceServicer):
    def __init__(self, cfg: SchedulerConfig, plane: SchedulerService) -> None:
        self.cfg = cfg
        self.plane = plane

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        problem = validate_registration(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        mismatch = self.plane.workers.mismatch(request.worker_id, list(request.models))
        if mismatch is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        self.plane.workers.register(
            request.worker_id, request.address, request.slots, list(request.models)
        )
        return scheduler_pb2.RegisterWorkerResponse(
            heartbeat_interval_seconds=self.cfg.heartbeat_interval_s
        )

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        return scheduler_pb2.HeartbeatResponse(
            known=self.plane.workers.heartbeat(request.worker_id)
        )

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetStatsResponse:
        return stats_response(self.plane, with_addresses=True)
