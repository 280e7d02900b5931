"""One request, one trace: client, scheduler, predictor, worker and the Triton call.

The services run in this process over real gRPC sockets, sharing one
in-memory exporter, so every span the request causes can be inspected.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from in_process import three_services
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shortline.common.telemetry import setup_tracing
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow

EXPORTER = InMemorySpanExporter()


def spans_named(spans: list[ReadableSpan], fragment: str) -> list[ReadableSpan]:
    return [s for s in spans if fragment in s.name]


async def test_a_request_is_one_trace_across_every_service(embedded_triton: Any) -> None:
    setup_tracing("shortline-test", exporter=EXPORTER)
    async with three_services(embedded_triton.grpc_url, "traced") as services:
        scheduler = services.scheduler
        tracer = trace.get_tracer("test-client")
        EXPORTER.clear()
        async with grpc.aio.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            with tracer.start_as_current_span("client.request") as root:
                call = stub.Generate(
                    scheduler_pb2.GenerateRequest(
                        request_id="traced-1",
                        model="replay",
                        prompt="Explain tides in one paragraph.",
                        max_tokens=12,
                        sampling=common_pb2.SamplingParams(ignore_eos=True),
                        length_model="Meta-Llama-3-8B-Instruct",
                    ),
                    timeout=60,
                )
                msgs = [m async for m in call]
        assert msgs[-1].result.actual_tokens == 12
        assert msgs[-1].result.prediction_source == scheduler_pb2.PREDICTION_SOURCE_PREDICTOR
        await asyncio.sleep(0.5)  # server-side spans end after the last message
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.force_flush()
    trace_id = root.get_span_context().trace_id
    spans = [s for s in EXPORTER.get_finished_spans() if s.context.trace_id == trace_id]
    names = sorted(s.name for s in spans)
    # gRPC instrumentation: a client and a server span per hop.
    for rpc in (
        "/shortline.scheduler.v1.SchedulerService/Generate",
        "/shortline.predictor.v1.PredictorService/Predict",
        "/shortline.worker.v1.WorkerService/Execute",
    ):
        kinds = {s.kind for s in spans if s.name == rpc}
        assert kinds == {trace.SpanKind.CLIENT, trace.SpanKind.SERVER}, (rpc, names)
    # Our own spans: queueing, prediction, dispatch, generation, the Triton call.
    for name in (
        "scheduler.generate",
        "scheduler.queue",
        "scheduler.predict",
        "predictor.predict",
        "scheduler.run",
        "worker.execute",
        "triton.stream_infer",
    ):
        assert spans_named(spans, name), f"no {name} span in {names}"
    run = spans_named(spans, "scheduler.run")[0]
    attrs = dict(run.attributes or {})
    assert attrs["shortline.request_id"] == "traced-1"
    assert attrs["shortline.target_model"] == "Meta-Llama-3-8B-Instruct"
    assert "shortline.queue_position" in attrs
    generate = spans_named(spans, "scheduler.generate")[0]
    gattrs = dict(generate.attributes or {})
    assert gattrs["shortline.actual_tokens"] == 12
    assert gattrs["shortline.predicted_tokens"] > 0
    assert gattrs["shortline.preemptions"] == 0
