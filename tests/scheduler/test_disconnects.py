"""A client that goes away frees its worker slot within 100 ms, whatever kind of
client it was, unless its request asked to be reattachable; then a retry with the
same id continues without a gap.

Real scheduler and worker on the embedded Triton (``live_stack``), real clients:
the SDK's sync and asyncio clients closed while streaming, a raw gRPC channel
closed under its reader, a raw asyncio channel whose reading task is cancelled,
and a client process killed with SIGKILL. Each sample is timed from the moment
of the disconnect to the moment the scheduler's core has released the job's slot
and the worker's slot is free, polled every millisecond; the p50 and p99 per kind
are printed (``-s``). The bound asserted is 100 ms at the median and 250 ms for
every sample (CI machines stall).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import Stack, replay_request, replay_text, stack, wait_for

from shortline.client import (
    AsyncShortlineClient,
    ClientOptions,
    ShortlineClient,
    StreamClosedError,
)
from shortline.common.stats import percentile
from shortline.scheduler.v1 import scheduler_pb2_grpc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LONG = 3000  # tokens: far longer than any sample, so only a disconnect ends the job
SLOT_FREE_S = 0.100
CI_MARGIN_S = 0.250
SAMPLES = 8

# A client process: the SDK's sync client, reading until it is killed.
KILLED_CLIENT = """
import sys
from shortline.client import ClientOptions, ShortlineClient

target, request_id, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
with ShortlineClient(ClientOptions(target=target)) as client:
    stream = client.generate(
        "go", model="replay", max_tokens=max_tokens, ignore_eos=True, request_id=request_id
    )
    for _ in stream:
        pass
"""


def request(request_id: str, max_tokens: int = LONG, **fields: Any) -> Any:
    return replay_request(request_id, max_tokens, **fields)


async def streaming(s: Stack, request_id: str) -> None:
    """Until ``request_id`` runs on the worker and has streamed text."""
    plane = s.scheduler.plane
    await wait_for(
        lambda: (req := plane.lookup(request_id)) is not None and req.tokens > 0, timeout=30
    )


async def slot_free_after(s: Stack, request_id: str, t0: float) -> float:
    """Seconds from ``t0`` until the core released the job and the worker's slot is free."""
    core = s.scheduler.plane.core
    worker = s.workers[0]
    while core.get(request_id) is not None or worker.servicer.slots.used:
        if time.monotonic() - t0 > 5.0:
            return float("inf")
        await asyncio.sleep(0.001)
    return time.monotonic() - t0


Disconnect = Callable[[Stack, str], Awaitable[float]]


async def sync_client_closed(s: Stack, request_id: str) -> float:
    client = ShortlineClient(ClientOptions(target=s.scheduler.address))
    stream = client.generate(
        "go", model="replay", max_tokens=LONG, ignore_eos=True, request_id=request_id
    )
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in stream:
                pass
        except StreamClosedError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    await streaming(s, request_id)

    def close() -> float:
        t0 = time.monotonic()
        client.close()
        return t0

    t0 = await asyncio.to_thread(close)
    await asyncio.to_thread(reader.join, 10)
    assert errors  # the reader learns its stream was closed
    return t0


async def sync_client_left_the_loop(s: Stack, request_id: str) -> float:
    """``break`` out of the stream (the generator is closed: the call is cancelled)."""
    client = ShortlineClient(ClientOptions(target=s.scheduler.address))
    t0_box: list[float] = []
    go = threading.Event()

    def read() -> None:
        for _ in client.generate(
            "go", model="replay", max_tokens=LONG, ignore_eos=True, request_id=request_id
        ):
            if go.is_set():
                t0_box.append(time.monotonic())
                break

    reader = threading.Thread(target=read)
    reader.start()
    await streaming(s, request_id)
    go.set()
    await asyncio.to_thread(reader.join, 10)
    client.close()
    return t0_box[0]


async def async_client_closed(s: Stack, request_id: str) -> float:
    client = AsyncShortlineClient(ClientOptions(target=s.scheduler.address))
    stream = client.generate(
        "go", model="replay", max_tokens=LONG, ignore_eos=True, request_id=request_id
    )
    reader = asyncio.create_task(stream.collect())
    await streaming(s, request_id)
    t0 = time.monotonic()
    await client.close()
    with pytest.raises(StreamClosedError):
        await asyncio.wait_for(reader, 10)
    return t0


async def raw_channel_closed(s: Stack, request_id: str) -> float:
    """A plain ``grpc.insecure_channel`` closed while another thread reads."""
    channel = grpc.insecure_channel(s.scheduler.address)
    call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request(request_id))

    def read() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    await streaming(s, request_id)
    t0 = time.monotonic()
    channel.close()
    await asyncio.to_thread(reader.join, 10)
    return t0


async def raw_aio_reader_cancelled(s: Stack, request_id: str) -> float:
    """A plain ``grpc.aio`` channel: the reading task cancelled, the channel closed.

    (``grpc.aio.Channel.close()`` alone does not end a stream another task reads,
    grpc/grpc#32005: that client keeps receiving, so it has not gone anywhere.)"""
    channel = grpc.aio.insecure_channel(s.scheduler.address)
    call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request(request_id))

    async def read() -> None:
        async for _ in call:
            pass

    reader = asyncio.create_task(read())
    await streaming(s, request_id)
    t0 = time.monotonic()
    reader.cancel()
    await channel.close(None)
    return t0


async def client_process_killed(s: Stack, request_id: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, s.scheduler.address, request_id, str(LONG)],
        cwd=REPO,
        env=env,
    )
    try:
        await streaming(s, request_id)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        return t0
    finally:
        await asyncio.to_thread(proc.wait, 10)


KINDS: dict[str, tuple[Disconnect, int]] = {
    "sync client close": (sync_client_closed, SAMPLES),
    "sync client break": (sync_client_left_the_loop, SAMPLES),
    "asyncio client close": (async_client_closed, SAMPLES),
    "raw channel close": (raw_channel_closed, SAMPLES),
    "raw aio reader cancelled": (raw_aio_reader_cancelled, SAMPLES),
    "client process killed": (client_process_killed, 4),
}


async def test_every_client_kind_frees_its_slot_within_100_ms(
    embedded_triton: Any, tmp_path: Path
) -> None:
    measured: dict[str, list[float]] = {}
    async with stack(embedded_triton.grpc_url, tmp_path, slots=2) as s:
        for kind, (disconnect, samples) in KINDS.items():
            times = measured[kind] = []
            for i in range(samples):
                request_id = f"{kind.replace(' ', '-')}-{i}"
                t0 = await disconnect(s, request_id)
                times.append(await slot_free_after(s, request_id, t0))
        core = s.scheduler.plane.core
        assert core.running == 0 and core.queue_depth == 0
        # Every one of them ended as "disconnected", not by a deadline or an error.
        finished = [s.scheduler.plane.lookup(f"sync-client-close-{i}") for i in range(SAMPLES)]
        assert all(r is not None and r.job.finish_reason == "disconnected" for r in finished)
    lines = []
    for kind, times in measured.items():
        p50, p99 = percentile(times, 50) * 1e3, percentile(times, 99) * 1e3
        lines.append(f"{kind:26s} n={len(times):2d} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms")
    print("\nslot free after a disconnect:\n" + "\n".join(lines))
    for kind, times in measured.items():
        assert percentile(times, 50) < SLOT_FREE_S, f"{kind}: {lines}"
        assert max(times) < CI_MARGIN_S, f"{kind}: {lines}"


async def test_a_reattachable_request_survives_a_disconnect_and_continues_without_a_gap(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        plane = s.scheduler.plane
        first = s.stub.Generate(request("keep", 400, reattach_grace_seconds=10.0), timeout=60)
        seen = ""
        async for msg in first:
            seen += msg.delta.text
            if msg.HasField("delta") and msg.delta.tokens and len(seen.split()) >= 20:
                break
        first.cancel()  # the client goes away mid-stream
        await asyncio.sleep(0.5)
        req = plane.lookup("keep")
        assert req is not None and not req.job.terminal  # still generating for a retry
        tokens_then = req.tokens
        await wait_for(lambda: req.tokens > tokens_then)
        msgs, text = await s.generate("keep", 400, reattach_grace_seconds=10.0)
        assert text == replay_text(1, 400)  # the replay, then the rest: no gap, no repeat
        assert text.startswith(seen)
        assert msgs[-1].result.actual_tokens == 400
        assert plane.core.completed == 1 and plane.core.cancelled == 0


async def test_the_reattach_grace_is_capped_and_a_late_retry_is_aborted(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path, max_reattach_grace_s=0.3) as s:
        plane = s.scheduler.plane
        call = s.stub.Generate(request("capped", reattach_grace_seconds=3600.0), timeout=60)
        async for msg in call:
            if msg.HasField("delta"):
                break
        call.cancel()
        t0 = time.monotonic()
        await wait_for(lambda: plane.core.get("capped") is None, timeout=5)
        waited = time.monotonic() - t0
        assert 0.25 < waited < 1.5  # the scheduler's cap, not the hour asked for
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.generate("capped", LONG, reattach_grace_seconds=3600.0)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "cancelled when its last stream went away" in (err.value.details() or "")
        assert "reattach_grace_seconds" in (err.value.details() or "")


async def test_a_bad_reattach_grace_is_invalid_argument(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.generate(f"bad-{bad}", 5, reattach_grace_seconds=bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "reattach_grace_seconds must be a finite number >= 0" in (
                err.value.details() or ""
            )
        assert s.scheduler.plane.core.stats().submitted == 0


async def test_the_sdk_sends_its_reattach_grace(embedded_triton: Any, tmp_path: Path) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        plane = s.scheduler.plane
        options = ClientOptions(target=s.scheduler.address, reattach_grace_seconds=7.5)
        async with AsyncShortlineClient(options) as client:
            stream = client.generate(
                "go", model="replay", max_tokens=5, ignore_eos=True, request_id="sdk"
            )
            assert await stream.collect() == replay_text(1, 5)
        req = plane.lookup("sdk")
        assert req is not None and req.reattach_grace_s == 7.5


async def test_a_stalled_client_that_leaves_frees_its_slot_and_logs_no_error(
    embedded_triton: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that stops reading fills its flow-control window, so the scheduler's
    handler is suspended in a send when the cancel comes: gRPC then drops the handler's
    generator instead of closing it. The slot is freed all the same, and nothing is
    logged as an error (a span left current across the yield used to be detached in
    another context, with a traceback)."""
    tiny_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        plane = s.scheduler.plane
        times = []
        for i in range(3):
            request_id = f"stalled-{i}"
            channel = grpc.aio.insecure_channel(s.scheduler.address, options=tiny_window)
            call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request(request_id))
            await call.read()  # Accepted; then nothing is read
            req = plane.lookup(request_id)
            assert req is not None
            await wait_for(lambda r=req: r.tokens >= 100)  # far past what the window holds
            t0 = time.monotonic()
            call.cancel()
            times.append(await slot_free_after(s, request_id, t0))
            await channel.close(None)
        await asyncio.sleep(0.2)  # time for the dropped generators to be finalized
    assert max(times) < CI_MARGIN_S, times
    # (grpc's own "ExecuteBatchError raised in core" line for a send that failed before
    # it saw the cancel is grpc's to fix; ours and OpenTelemetry's must stay quiet.)
    ours = ("services", "shortline", "opentelemetry")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(ours)]
    assert not errors, [r.getMessage() for r in errors]
