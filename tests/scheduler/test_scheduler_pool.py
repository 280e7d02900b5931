"""A scheduler serves one model pool: a worker with other models is refused."""

from __future__ import annotations

import grpc
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from shortline.common.net import free_port
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


async def test_worker_with_other_models_is_refused_with_a_clear_status() -> None:
    server = SchedulerServer(SchedulerConfig(host="127.0.0.1", port=free_port(), internal_port=0))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.internal_address) as channel:
            stub = internal_pb2_grpc.SchedulerInternalServiceStub(channel)
            await stub.RegisterWorker(
                scheduler_pb2.RegisterWorkerRequest(
                    worker_id="a", address="127.0.0.1:1", slots=2, models=["replay", "smollm2"]
                )
            )
            # Same pool, listed in another order: accepted.
            await stub.RegisterWorker(
                scheduler_pb2.RegisterWorkerRequest(
                    worker_id="b", address="127.0.0.1:2", slots=2, models=["smollm2", "replay"]
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.RegisterWorker(
                    scheduler_pb2.RegisterWorkerRequest(
                        worker_id="c", address="127.0.0.1:3", slots=2, models=["llama"]
                    )
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "worker c" in (info.value.details() or "")
            assert "one scheduler per model pool" in (info.value.details() or "")
            stats = await stub.GetStats(scheduler_pb2.GetStatsRequest())
            assert sorted(w.worker_id for w in stats.workers) == ["a", "b"]
    finally:
        await server.stop(0.1)


async def test_the_public_port_refuses_worker_rpcs_and_hides_worker_addresses() -> None:
    server = SchedulerServer(SchedulerConfig(host="127.0.0.1", port=free_port(), internal_port=0))
    await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(server.address) as public,
            grpc.aio.insecure_channel(server.internal_address) as internal,
        ):
            stub = scheduler_pb2_grpc.SchedulerServiceStub(public)
            fake = scheduler_pb2.RegisterWorkerRequest(
                worker_id="fake", address="127.0.0.1:1", slots=64, models=["replay"]
            )
            for call in (
                stub.RegisterWorker(fake),
                stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="fake")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                details = info.value.details() or ""
                assert "shortline.scheduler.v1.SchedulerInternalService" in details
                assert server.internal_address in details
            assert len(server.plane.workers) == 0
            # Registered on the internal port: users see the worker, not its address.
            inner = internal_pb2_grpc.SchedulerInternalServiceStub(internal)
            real = scheduler_pb2.RegisterWorkerRequest(
                worker_id="real", address="127.0.0.1:2", slots=2, models=["replay"]
            )
            await inner.RegisterWorker(real)
            public_stats = await stub.GetStats(scheduler_pb2.GetStatsRequest())
            assert [(w.worker_id, w.address) for w in public_stats.workers] == [("real", "")]
            operator_stats = await inner.GetStats(scheduler_pb2.GetStatsRequest())
            assert [w.address for w in operator_stats.workers] == ["127.0.0.1:2"]
    finally:
        await server.stop(0.1)
