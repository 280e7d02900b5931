"""Traces that tell the truth: nothing on an idle stack, the Triton stream span ends
with its request, and the SDK's span is the root of the request's trace.

The three services run in this process over real gRPC sockets (predictor, scheduler,
one worker on the session's embedded Triton), with an in-memory exporter added to
the process's tracer provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from in_process import three_services
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shortline.client import AsyncShortlineClient, ClientOptions, ShortlineClient
from shortline.client.tracing import SPAN_NAME
from shortline.common.telemetry import setup_tracing

pytestmark = pytest.mark.slow

EXPORTER = InMemorySpanExporter()


@dataclass
class Traced:
    scheduler: Any
    predictor: Any
    worker: Any


def finished() -> list[ReadableSpan]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.force_flush()
    return list(EXPORTER.get_finished_spans())


@pytest.fixture(scope="module")
async def traced(embedded_triton: Any) -> AsyncIterator[Traced]:
    setup_tracing("shortline-test", exporter=EXPORTER)
    async with three_services(embedded_triton.grpc_url, "truth", health_poll_s=0.2) as s:
        yield Traced(s.scheduler, s.predictor, s.worker)


async def test_an_idle_stack_makes_no_spans(traced: Traced) -> None:
    """Heartbeats (every 0.2 s), readiness polls of Triton (every 0.2 s) and health
    checks of every server over 3 s: not one span."""
    finished()
    EXPORTER.clear()
    addresses = [
        traced.scheduler.address,
        traced.scheduler.internal_address,
        f"127.0.0.1:{traced.predictor.cfg.port}",
        traced.worker.address,
    ]
    beats = traced.scheduler.plane.workers.get("truth").last_seen
    for _ in range(6):
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        await asyncio.sleep(0.5)
    assert traced.scheduler.plane.workers.get("truth").last_seen > beats  # it did beat
    names = sorted({s.name for s in finished()})
    assert names == [], names


async def test_the_triton_stream_span_ends_with_its_request(traced: Traced) -> None:
    EXPORTER.clear()
    async with AsyncShortlineClient(ClientOptions(target=traced.scheduler.address)) as client:
        stream = client.generate(
            "Explain tides.", model="replay", max_tokens=12, ignore_eos=True, request_id="t-end"
        )
        await stream.collect()
        ended_ns = time.time_ns()
    assert stream.result is not None and stream.result.actual_tokens == 12
    await asyncio.sleep(3.0)  # longer than any span of the request may take to end
    spans = finished()
    tid = next(s.context.trace_id for s in spans if s.name == SPAN_NAME)
    mine = [s for s in spans if s.context.trace_id == tid]
    late = {
        s.name: round((s.end_time or 0) / 1e9 - ended_ns / 1e9, 3)
        for s in mine
        if s.name in ("triton.stream_infer", "/inference.GRPCInferenceService/ModelStreamInfer")
    }
    print("span end after the request's end (s):", late)
    # Both: our span, and the gRPC call's own (open until Triton ends the stream).
    assert len(late) == 2, sorted(s.name for s in mine)
    assert all(seconds < 1.0 for seconds in late.values()), late


def _root_of(spans: list[ReadableSpan], request_id: str) -> tuple[ReadableSpan, list[str]]:
    client = [
        s
        for s in spans
        if s.name == SPAN_NAME and (s.attributes or {}).get("shortline.request_id") == request_id
    ]
    assert len(client) == 1, [s.name for s in spans]
    tid = client[0].context.trace_id
    mine = [s for s in spans if s.context.trace_id == tid]
    roots = [s for s in mine if s.parent is None]
    return roots[0] if len(roots) == 1 else client[0], sorted(s.name for s in mine)


async def test_the_sdk_span_is_the_root_of_the_trace_async(traced: Traced) -> None:
    EXPORTER.clear()
    async with AsyncShortlineClient(ClientOptions(target=traced.scheduler.address)) as client:
        await client.generate("Hi.", model="replay", max_tokens=4, request_id="root-aio").collect()
    await asyncio.sleep(0.5)
    root, names = _root_of(finished(), "root-aio")
    assert root.name == SPAN_NAME and root.parent is None, names
    attrs = dict(root.attributes or {})
    assert attrs["shortline.model"] == "replay" and attrs["shortline.actual_tokens"] == 4
    for name in ("scheduler.generate", "worker.execute", "triton.stream_infer"):
        assert name in names, names


async def test_the_sdk_span_is_the_root_of_the_trace_sync(traced: Traced) -> None:
    """The blocking SDK's channel has no instrumentation: only the SDK's own
    ``traceparent`` joins the scheduler to the caller's trace."""
    EXPORTER.clear()

    def call() -> None:
        with ShortlineClient(ClientOptions(target=traced.scheduler.address)) as client:
            list(client.generate("Hi.", model="replay", max_tokens=4, request_id="root-sync"))

    await asyncio.to_thread(call)
    await asyncio.sleep(0.5)
    root, names = _root_of(finished(), "root-sync")
    assert root.name == SPAN_NAME and root.parent is None, names
    assert "scheduler.generate" in names and "triton.stream_infer" in names, names
