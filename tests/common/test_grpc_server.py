"""Every server speaks health and reflection, and a taken port is named."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shortline.common.grpc_server import PortInUseError, build_server, set_serving
from shortline.common.net import free_port
from shortline.scheduler.v1 import scheduler_pb2

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


async def test_health_and_reflection_are_served() -> None:
    address = f"127.0.0.1:{free_port()}"
    server, health = build_server(lambda s: None, [SERVICE], address)
    await server.start()
    await set_serving(health, [SERVICE], False)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            before = await stub.Check(request)
            assert before.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await set_serving(health, [SERVICE], True)
            after = await stub.Check(request)
            assert after.status == health_pb2.HealthCheckResponse.SERVING

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def one() -> reflection_pb2.ServerReflectionRequest:
                return reflection_pb2.ServerReflectionRequest(list_services="")

            names: list[str] = []
            async for response in reflect.ServerReflectionInfo(_aiter([await one()])):
                names = [s.name for s in response.list_services_response.service]
            assert SERVICE in names
            assert "grpc.health.v1.Health" in names
    finally:
        await server.stop(None)


async def _aiter(items: list[reflection_pb2.ServerReflectionRequest]):  # type: ignore[no-untyped-def]
    for item in items:
        yield item


async def test_taken_port_is_named_in_the_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port}"):
            build_server(lambda s: None, [SERVICE], f"127.0.0.1:{port}")
