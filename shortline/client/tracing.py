"""The SDK's span: one per Generate stream, so a request's trace starts at the caller.

Only ``opentelemetry-api``: an application without an SDK configured gets the
API's no-op tracer and pays next to nothing; one with an SDK sees a CLIENT span
per stream (all its retries included) with the request id and model, parent of
everything the services do for the request. The span's context goes into the
call's gRPC metadata with the W3C trace-context propagator itself, so the
scheduler joins the caller's trace even when the application does not install
the gRPC instrumentation (if it does, the instrumentation's own child span
replaces the header with its context: the same trace either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import grpc
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shortline.client.types import Result

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("shortline.client")

SPAN_NAME = "shortline.client.generate"


def start_span(request_id: str, model: str, max_tokens: int) -> trace.Span:
    """The span of one Generate stream (the caller's current span, if any, its parent)."""
    return _tracer.start_span(
        SPAN_NAME,
        kind=trace.SpanKind.CLIENT,
        attributes={
            "shortline.request_id": request_id,
            "shortline.model": model,
            "shortline.max_tokens": max_tokens,
            "rpc.system": "grpc",
            "rpc.service": "shortline.scheduler.v1.SchedulerService",
            "rpc.method": "Generate",
        },
    )


def with_context(
    span: trace.Span, metadata: Sequence[tuple[str, str]] | None
) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the span's ``traceparent`` (and ``tracestate``)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    kept = tuple((k, v) for k, v in (metadata or ()) if k not in carrier)
    return (*kept, *carrier.items())


def retried(span: trace.Span, error: grpc.RpcError, attempt: int) -> None:
    """Notes a retried attempt on the span (the stream goes on)."""
    code = error.code() if isinstance(error, grpc.Call) else None
    span.add_event("retry", {"attempt": attempt, "rpc.grpc.status_code": code.name if code else ""})


def end(span: trace.Span, result: Result | None, error: BaseException | None) -> None:
    """Ends the span with what the stream got: the result's figures or the error."""
    if result is not None:
        span.set_attribute("shortline.actual_tokens", result.actual_tokens)
        span.set_attribute("shortline.predicted_tokens", result.predicted_tokens)
        span.set_attribute("shortline.queue_wait_s", result.queue_wait_seconds)
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
    span.end()


def current(span: trace.Span) -> AbstractContextManager[trace.Span]:
    """Makes ``span`` current while a call is created (not ended on exit), so that an
    instrumented channel's own span is its child."""
    return trace.use_span(span, end_on_exit=False)
