"""A predictor, a scheduler and a worker in this process, over real gRPC sockets on
127.0.0.1: for tests that must see inside every service at once (one tracer
provider, each service's metrics registry)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from services.predictor.config import PredictorConfig
from services.predictor.service import PredictorServer
from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from services.worker.config import WorkerConfig
from services.worker.service.server import WorkerServer
from shortline.common.net import free_port


@dataclass
class Services:
    predictor: PredictorServer
    scheduler: SchedulerServer
    worker: WorkerServer


@asynccontextmanager
async def three_services(
    triton_url: str,
    worker_id: str,
    *,
    slots: int = 2,
    health_poll_s: float = 0.5,
    **scheduler_fields: Any,
) -> AsyncIterator[Services]:
    """The three services, the worker registered; ``scheduler_fields`` go to its config."""
    predictor = PredictorServer(PredictorConfig(port=free_port()))
    await predictor.start()
    scheduler = SchedulerServer(
        SchedulerConfig(
            host="127.0.0.1",
            port=free_port(),
            internal_port=0,
            predictor=f"127.0.0.1:{predictor.cfg.port}",
            predictor_timeout_ms=5000,
            heartbeat_interval_s=0.2,
            **scheduler_fields,
        )
    )
    await scheduler.start()
    worker = WorkerServer(
        WorkerConfig(
            triton=triton_url,
            slots=slots,
            scheduler=scheduler.internal_address,
            worker_id=worker_id,
            health_poll_s=health_poll_s,
        ),
        triton_url,
    )
    await worker.start()
    try:
        for _ in range(200):
            if scheduler.plane.workers:
                break
            await asyncio.sleep(0.05)
        yield Services(predictor, scheduler, worker)
    finally:
        await worker.stop(0.1)
        await scheduler.stop(0.1)
        await predictor.stop(0.1)
