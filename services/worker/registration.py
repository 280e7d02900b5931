"""Joining a scheduler: RegisterWorker, then Heartbeat at the interval it asks for.

The worker keeps serving when the scheduler is down and registers again when
a heartbeat says the scheduler does not know it (e.g. after a restart).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

if TYPE_CHECKING:
    from services.worker.server import WorkerServicer

log = logging.getLogger(__name__)

RETRY_S = 1.0


async def keep_registered(scheduler: str, advertise: str, servicer: WorkerServicer) -> None:
    async with grpc.aio.insecure_channel(scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        registered = False
        interval = RETRY_S
        warned = False
        while True:
            try:
                if not registered:
                    reply = await stub.RegisterWorker(
                        scheduler_pb2.RegisterWorkerRequest(
                            worker_id=servicer.worker_id,
                            address=advertise,
                            slots=servicer.slots.total,
                            models=sorted(servicer.models),
                        ),
                        timeout=5.0,
                    )
                    interval = reply.heartbeat_interval_seconds or RETRY_S
                    registered = True
                    warned = False
                    log.info("registered with scheduler %s as %s", scheduler, servicer.worker_id)
                else:
                    beat = await stub.Heartbeat(
                        scheduler_pb2.HeartbeatRequest(
                            worker_id=servicer.worker_id,
                            slots_used=servicer.slots.used,
                            serving=servicer.serving,
                        ),
                        timeout=max(1.0, interval),
                    )
                    if not beat.known:
                        log.info("scheduler %s forgot this worker; registering again", scheduler)
                        registered = False
                        continue
            except grpc.aio.AioRpcError as exc:
                if not warned:
                    log.warning("scheduler %s: %s (will keep trying)", scheduler, exc.code().name)
                    warned = True
                registered = False
                interval = RETRY_S
            await asyncio.sleep(interval)
