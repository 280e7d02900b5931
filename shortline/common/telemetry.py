"""OpenTelemetry set-up shared by every service.

Call :func:`setup_tracing` once per process, before any gRPC server or channel
is created, so that the gRPC instrumentation propagates ``traceparent`` in
metadata and every request becomes one trace across services. Spans are
exported by OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; tests pass their
own in-memory exporter.
"""

from __future__ import annotations

import os
import threading

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor

_lock = threading.Lock()
_configured = False


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> None:
    """Installs a tracer provider and the gRPC aio instrumentation (idempotent)."""
    global _configured
    with _lock:
        if _configured:
            return
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        processor: SpanProcessor | None = None
        if exporter is not None:
            processor = BatchSpanProcessor(exporter)
        elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
        if processor is not None:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        from opentelemetry.instrumentation.grpc import (
            GrpcAioInstrumentorClient,
            GrpcAioInstrumentorServer,
        )

        GrpcAioInstrumentorServer().instrument()
        GrpcAioInstrumentorClient().instrument()
        _configured = True


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
