"""OpenTelemetry set-up shared by every service.

Call :func:`setup_tracing` once per process, before any gRPC server or channel
is created, so that the gRPC instrumentation propagates ``traceparent`` in
metadata and every request becomes one trace across services. Spans are
exported by OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; tests pass their
own in-memory exporter.

The resource comes from the environment as the OpenTelemetry specification
says (``OTEL_SERVICE_NAME``, then ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``);
the service's own name is only the default. ``Resource.create`` merges the
attributes it is given over the environment's, so passing the default there
would silently win over the operator's name.

Calls that say nothing about a request are not traced: health checks,
reflection, worker heartbeats and the worker's readiness polls of Triton. On an
idle stack they made four traces a second, burying the requests' traces and
paying for each. ``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES`` adds services to that list.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor

_lock = threading.Lock()
_provider: TracerProvider | None = None

# Fully qualified gRPC services and methods never traced (see the module docstring).
UNTRACED_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
UNTRACED_METHODS = (
    "/shortline.scheduler.v1.SchedulerInternalService/Heartbeat",
    # One long-lived stream per worker carrying every job's deltas, not a request's.
    "/shortline.worker.v1.WorkerService/StreamDeltas",
    # The worker's readiness polls and model listing (tritonclient, Triton's API).
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/RepositoryIndex",
)
EXCLUDED_SERVICES_ENV = "OTEL_PYTHON_GRPC_EXCLUDED_SERVICES"


def resource(default_service_name: str) -> Resource:
    """The process's resource: the environment's attributes, with ``service.name``
    ``default_service_name`` unless the environment names the service."""
    from_env = OTELResourceDetector().detect()
    defaults: dict[str, Any] = {}
    if not from_env.attributes.get(SERVICE_NAME):
        defaults[SERVICE_NAME] = default_service_name
    return Resource.create(defaults)


def _method(details: Any) -> str:
    method = getattr(details, "method", "") or ""
    return method.decode() if isinstance(method, bytes) else str(method)


def traced_call_filter(extra_services: tuple[str, ...] = ()) -> Callable[[Any], bool]:
    """The gRPC instrumentation's filter (True: trace the call) for servers and clients."""
    services = tuple(f"/{s}/" for s in (*UNTRACED_SERVICES, *extra_services))
    methods = frozenset(UNTRACED_METHODS)

    def traced(details: Any) -> bool:
        method = _method(details)
        return method not in methods and not method.startswith(services)

    return traced


def _excluded_from_env() -> tuple[str, ...]:
    raw = os.environ.get(EXCLUDED_SERVICES_ENV, "")
    return tuple(s.strip() for s in raw.split(",") if s.strip())


def _instrument_grpc() -> None:
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )

    traced = traced_call_filter(_excluded_from_env())
    for instrumentor in (
        GrpcAioInstrumentorServer(filter_=traced),
        GrpcAioInstrumentorClient(filter_=traced),
    ):
        # With the environment variable set, the instrumentation ORs its own filter with
        # ours ("trace if either says so"), which would trace every call ours drops; ours
        # already holds the variable's services.
        instrumentor._filter = traced
        instrumentor.instrument()


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Installs a tracer provider (resource from the environment, ``service_name`` the
    default) and the gRPC aio instrumentation, once per process. A later call only adds
    its ``exporter`` to the installed provider: several tests of one process may each
    watch the spans."""
    global _provider
    with _lock:
        if _provider is not None:
            if exporter is not None:
                _provider.add_span_processor(BatchSpanProcessor(exporter))
            return _provider
        provider = TracerProvider(resource=resource(service_name))
        processor: SpanProcessor | None = None
        if exporter is not None:
            processor = BatchSpanProcessor(exporter)
        elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
        if processor is not None:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        _instrument_grpc()
        _provider = provider
        return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
