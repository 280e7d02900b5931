"""Every RPC of a server made by ``build_server`` answers a defined status, whatever
arrives: bytes that do not parse, a servicer's unexpected exception, a status message
that quotes a giant input; each in one log line, never a traceback.

A real grpc.aio server on 127.0.0.1 with a small echo service whose request type is a
real Shortline message (``CancelRequest``), plus the health and reflection every
server carries; the calls are raw bytes, as any client could send them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shortline.common import rpc_errors
from shortline.common.grpc_server import build_server
from shortline.common.net import free_port
from shortline.common.rpc_errors import MAX_STATUS_CHARS, Undecodable, safe_deserializer
from shortline.scheduler.v1 import scheduler_pb2

SERVICE = "test.v1.Echo"
TYPE = "shortline.scheduler.v1.CancelRequest"
NOT_PROTOBUF = b"\xff\xff\xff"  # field 31, wire type 7: no such wire type
INVALID_UTF8 = b"\x0a\x02\xff\xfe"  # request_id, 2 bytes that are not UTF-8


class Echo:
    """Behaves as each test's request_id asks: echo, raise, abort, stream."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = asyncio.Event()

    async def unary(
        self, request: scheduler_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CancelRequest:
        self.calls += 1
        what = request.request_id
        if what == "value":
            int("not a number")
        if what == "oserror":
            raise ConnectionRefusedError("the database went away")
        if what == "memory":
            raise MemoryError()
        if what == "zero":
            return scheduler_pb2.CancelRequest(request_id=str(1 / len(what[5:])))
        if what.startswith("giant"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {what!r} is unknown")
        return request

    async def stream(
        self, request: scheduler_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.CancelRequest]:
        self.calls += 1
        try:
            for i in range(3):
                yield scheduler_pb2.CancelRequest(request_id=str(i))
                if request.request_id == "fail" and i == 1:
                    raise KeyError("missing")
            if request.request_id == "slow":
                await asyncio.sleep(30)
        finally:
            self.closed.set()


def _handlers(echo: Echo) -> grpc.GenericRpcHandler:
    kind = {
        "request_deserializer": scheduler_pb2.CancelRequest.FromString,
        "response_serializer": scheduler_pb2.CancelRequest.SerializeToString,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(echo.unary, **kind),
            "Stream": grpc.unary_stream_rpc_method_handler(echo.stream, **kind),
        },
    )


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, Echo]]:
    echo = Echo()
    address = f"127.0.0.1:{free_port()}"
    server, _ = build_server(
        lambda s: s.add_generic_rpc_handlers((_handlers(echo),)),
        [SERVICE],
        address,
        max_message_bytes=64 * 1024,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield channel, echo
    finally:
        await server.stop(None)


async def _unary(channel: grpc.aio.Channel, method: str, payload: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(method, None, None)(payload, timeout=5)
    return caught.value


def _cancel(request_id: str) -> bytes:
    return scheduler_pb2.CancelRequest(request_id=request_id).SerializeToString()


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not [r for r in shown if r.exc_info], [r.getMessage() for r in shown]
    assert not [r for r in shown if "\n" in r.getMessage()]


@pytest.mark.parametrize("payload", [NOT_PROTOBUF, INVALID_UTF8], ids=["wire", "utf8"])
async def test_undecodable_bytes_are_invalid_argument_naming_the_type(
    served: tuple[grpc.aio.Channel, Echo], caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    channel, echo = served
    rpc_errors._throttle._last.clear()
    error = await _unary(channel, f"/{SERVICE}/Unary", payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request is not a valid {TYPE}" in (error.details() or "")
    assert echo.calls == 0  # the servicer never sees it
    lines = [r for r in caplog.records if r.name == rpc_errors.__name__]
    assert len(lines) == 1
    assert f"{SERVICE}/Unary" in lines[0].getMessage() and TYPE in lines[0].getMessage()
    _no_traceback(caplog)


async def test_undecodable_bytes_on_streams_health_and_reflection(
    served: tuple[grpc.aio.Channel, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    channel, echo = served
    calls: list[Any] = [
        channel.unary_stream(f"/{SERVICE}/Stream", None, None)(NOT_PROTOBUF, timeout=5),
        channel.unary_stream("/grpc.health.v1.Health/Watch", None, None)(NOT_PROTOBUF),
        channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
        )(iter([NOT_PROTOBUF]), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    error = await _unary(channel, "/grpc.health.v1.Health/Check", INVALID_UTF8)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.health.v1.HealthCheckRequest" in (error.details() or "")
    assert echo.calls == 0
    _no_traceback(caplog)


@pytest.mark.parametrize(
    ("request_id", "code"),
    [
        ("value", grpc.StatusCode.INVALID_ARGUMENT),
        ("zero", grpc.StatusCode.INVALID_ARGUMENT),
        ("oserror", grpc.StatusCode.UNAVAILABLE),
        ("memory", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_unexpected_exception_is_a_defined_status_in_one_line(
    served: tuple[grpc.aio.Channel, Echo],
    caplog: pytest.LogCaptureFixture,
    request_id: str,
    code: grpc.StatusCode,
) -> None:
    channel, _ = served
    rpc_errors._throttle._last.clear()
    error = await _unary(channel, f"/{SERVICE}/Unary", _cancel(request_id))
    assert error.code() == code
    assert f"{SERVICE}/Unary could not handle this request" in (error.details() or "")
    lines = [r for r in caplog.records if r.name == rpc_errors.__name__]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert "test_rpc_errors.py:" in lines[0].getMessage()  # where, for the operator
    _no_traceback(caplog)


async def test_a_stream_that_raises_midway_ends_with_a_defined_status(
    served: tuple[grpc.aio.Channel, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    channel, _ = served
    got: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in channel.unary_stream(f"/{SERVICE}/Stream", None, None)(
            _cancel("fail"), timeout=5
        ):
            got.append(item)
    assert len(got) == 2
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KeyError" in (caught.value.details() or "")
    _no_traceback(caplog)


async def test_a_cancelled_stream_closes_the_servicer_at_once(
    served: tuple[grpc.aio.Channel, Echo],
) -> None:
    channel, echo = served
    call = channel.unary_stream(f"/{SERVICE}/Stream", None, None)(_cancel("slow"), timeout=10)
    async for _ in call:
        break
    call.cancel()
    await asyncio.wait_for(echo.closed.wait(), 2.0)


async def test_aborts_keep_their_code_and_giant_messages_are_cut(
    served: tuple[grpc.aio.Channel, Echo],
) -> None:
    channel, _ = served
    error = await _unary(channel, f"/{SERVICE}/Unary", _cancel("giant" + "\u4e2d" * 20_000))
    # Uncut, the client's transport refuses the 180 KB trailer: RESOURCE_EXHAUSTED.
    assert error.code() == grpc.StatusCode.NOT_FOUND
    details = error.details() or ""
    assert details.startswith("model 'giant") and len(details) == MAX_STATUS_CHARS
    ok = await channel.unary_unary(f"/{SERVICE}/Unary", None, None)(_cancel("fine"), timeout=5)
    assert scheduler_pb2.CancelRequest.FromString(ok).request_id == "fine"


async def test_over_size_messages_are_refused_by_grpc_with_resource_exhausted(
    served: tuple[grpc.aio.Channel, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    channel, echo = served
    error = await _unary(channel, f"/{SERVICE}/Unary", _cancel("x" * 100_000))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (error.details() or "")
    for _ in range(200):  # a stream's over-size request: no traceback from grpc's race
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
            )(iter([b"\x1a" + b"\x01" * 100_000]), timeout=5):
                pass
    assert echo.calls == 0
    _no_traceback(caplog)


async def test_a_flood_of_bad_messages_logs_a_few_lines(
    served: tuple[grpc.aio.Channel, Echo], caplog: pytest.LogCaptureFixture
) -> None:
    channel, _ = served
    rpc_errors._throttle._last.clear()
    for _ in range(50):
        await _unary(channel, f"/{SERVICE}/Unary", NOT_PROTOBUF)
    lines = [r for r in caplog.records if r.name == rpc_errors.__name__]
    assert 1 <= len(lines) <= 3


@given(st.binary(max_size=256))
def test_the_safe_deserializer_never_raises(data: bytes) -> None:
    parse = safe_deserializer(scheduler_pb2.GenerateRequest.FromString, "GenerateRequest")
    assert parse is not None
    result = parse(data)
    assert isinstance(result, (scheduler_pb2.GenerateRequest, Undecodable))
