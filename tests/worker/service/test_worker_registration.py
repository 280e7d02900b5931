"""The worker joins a scheduler, heartbeats, and registers again when forgotten.

The scheduler side here is a minimal SchedulerService that only records what
workers send (the worker's protocol is under test, not the scheduler). The
first test drives ``keep_registered`` alone with a status callable; the
second a whole WorkerServer whose Triton address is dead, so it must report
itself not serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.worker.config import WorkerConfig
from services.worker.service.registration import Membership, WorkerStatus, keep_registered
from services.worker.service.server import WorkerServer
from shortline.common.net import free_port
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2


class RecordingScheduler(internal_pb2_grpc.SchedulerInternalServiceServicer):
    def __init__(self) -> None:
        self.registrations: list[scheduler_pb2.RegisterWorkerRequest] = []
        self.heartbeats: list[scheduler_pb2.HeartbeatRequest] = []
        self.known: set[str] = set()

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        self.registrations.append(request)
        self.known.add(request.worker_id)
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_seconds=0.05)

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        self.heartbeats.append(request)
        return scheduler_pb2.HeartbeatResponse(known=request.worker_id in self.known)


async def _start_scheduler(port: int, servicer: RecordingScheduler) -> grpc.aio.Server:
    server = grpc.aio.server()
    internal_pb2_grpc.add_SchedulerInternalServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
async def scheduler_port() -> AsyncIterator[int]:
    yield free_port()


async def test_heartbeats_report_what_the_status_callable_returns_at_each_beat(
    scheduler_port: int,
) -> None:
    servicer = RecordingScheduler()
    scheduler = await _start_scheduler(scheduler_port, servicer)
    serving = False
    membership = Membership(worker_id="w-unit", address="here:1", slots=3, models=("a", "b"))

    def status() -> WorkerStatus:
        return WorkerStatus(slots_used=2, serving=serving)

    task = asyncio.create_task(keep_registered(f"127.0.0.1:{scheduler_port}", membership, status))
    try:
        await _until(lambda: len(servicer.heartbeats) >= 2)
        serving = True
        await _until(lambda: servicer.heartbeats[-1].serving)
        reg = servicer.registrations[0]
        assert (reg.worker_id, reg.address, reg.slots) == ("w-unit", "here:1", 3)
        assert list(reg.models) == ["a", "b"]
        assert not servicer.heartbeats[0].serving
        assert all(hb.slots_used == 2 for hb in servicer.heartbeats)
        assert len(servicer.registrations) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await scheduler.stop(0.1)


@pytest.mark.slow
async def test_worker_registers_late_scheduler_and_reregisters_when_forgotten(
    scheduler_port: int,
) -> None:
    dead_triton = f"127.0.0.1:{free_port()}"
    config = WorkerConfig(
        slots=5, worker_id="w-reg", scheduler=f"127.0.0.1:{scheduler_port}", health_poll_s=0.2
    )
    worker = WorkerServer(config, dead_triton)
    await worker.start()  # the scheduler is not up yet: the worker must keep trying
    servicer = RecordingScheduler()
    scheduler = None
    try:
        await asyncio.sleep(0.3)
        scheduler = await _start_scheduler(scheduler_port, servicer)
        await _until(lambda: len(servicer.registrations) == 1 and len(servicer.heartbeats) >= 2)
        reg = servicer.registrations[0]
        assert (reg.worker_id, reg.address, reg.slots) == ("w-reg", worker.address, 5)
        assert set(reg.models) == {"replay", "smollm2-135m-instruct"}
        assert all(not hb.serving for hb in servicer.heartbeats)
        servicer.known.clear()  # e.g. the scheduler restarted and lost its registry
        await _until(lambda: len(servicer.registrations) == 2)
    finally:
        await worker.stop(0.2)
        if scheduler is not None:
            await scheduler.stop(0.2)
