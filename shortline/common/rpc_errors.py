"""Every RPC answers a defined status, whatever bytes or values arrive.

gRPC calls a method's ``request_deserializer`` (the generated
``Request.FromString``) before any servicer code runs; when it raises, grpc
answers ``UNKNOWN`` and logs a traceback, and no servicer can catch it. So
:class:`DefinedStatus`, one server interceptor that ``grpc_server.build_server``
installs on every server (each service's own RPCs, health and reflection),
replaces each handler's deserializer with one that never raises: bytes that
do not parse become an :class:`Undecodable` marker, and the wrapped handler
answers it with ``INVALID_ARGUMENT`` naming the message type, in one log line.

The same wrapper is the last resort for an exception a servicer did not
expect: one log line (the RPC, the exception's type and where it was raised,
never its text, which may quote a prompt) and a status chosen by what the
exception means (:func:`status_for`), never ``UNKNOWN`` or ``INTERNAL``. The
causes such exceptions reveal are bugs to fix in the servicer; this only
keeps them from becoming ``UNKNOWN`` with a traceback per request.

Messages above the server's size limit never reach a deserializer: gRPC
itself answers ``RESOURCE_EXHAUSTED`` ("Received message larger than max").
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

# A flood of bad messages must not flood the log: at most one line per RPC and
# kind of failure per interval, the next one says how many were not logged.
LOG_INTERVAL_S = 1.0
# Status messages quote an exception's text only up to this many characters.
MAX_DETAIL = 200
# Any status message: 800 characters are at most 3,200 UTF-8 bytes, 9,600 once
# percent-encoded in the grpc-message trailer, under the 16 KiB clients accept.
MAX_STATUS_CHARS = 800
# See _checked_stream.
STREAM_END_SETTLE_S = 0.005


@dataclass(frozen=True)
class Undecodable:
    """What a request that protobuf could not parse becomes (never a servicer's input)."""

    type_name: str
    size: int
    error: str  # empty for protobuf's DecodeError, whose text only repeats the type

    def message(self) -> str:
        why = f"{self.error[:MAX_DETAIL]}; " if self.error else ""
        return (
            f"request is not a valid {self.type_name}: its {self.size} bytes do not parse "
            f"({why}malformed wire format, or a string field that is not UTF-8)"
        )


class _Throttle:
    """Counts events per key and says when one may be logged."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._skipped: dict[tuple[str, str], int] = {}

    def allow(self, key: tuple[str, str]) -> int | None:
        """None when this event is not logged; else how many were not logged before it."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._skipped.pop(key, 0)


_throttle = _Throttle(LOG_INTERVAL_S)


def _log(level: int, rpc: str, kind: str, text: str, *args: object) -> None:
    skipped = _throttle.allow((rpc, kind))
    if skipped is None:
        return
    suffix = f" ({skipped} more since the last line)" if skipped else ""
    log.log(level, "%s: " + text + "%s", rpc, *args, suffix)


def type_name_of(deserializer: Callable[[bytes], Any] | None, method: str) -> str:
    """The protobuf type a deserializer makes (``FromString``'s class), else the method."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else f"request of {method}"


def safe_deserializer(
    deserializer: Callable[[bytes], Any] | None, type_name: str
) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns :class:`Undecodable` instead of raising."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Undecodable(type_name, len(data), "")
        except Exception as exc:  # whatever another deserializer raises
            return Undecodable(type_name, len(data), f"{type(exc).__name__}: {exc}")

    return deserialize


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The defined status an unexpected exception becomes.

    The exception escaped while handling one request, so it is that request's
    answer: values the code could not take (the usual cause) are
    ``INVALID_ARGUMENT``; exhaustion, timeouts and failed dependencies say so.
    """
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, (OSError, grpc.RpcError)):  # a socket, a file, another service
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INVALID_ARGUMENT


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


class _Aborts(Protocol):
    async def abort(self, code: grpc.StatusCode, details: str = "") -> None: ...


async def _refuse(rpc: str, request: Undecodable, context: _Aborts) -> None:
    _log(
        logging.WARNING,
        rpc,
        "undecodable",
        "INVALID_ARGUMENT: %d bytes that are not a valid %s",
        request.size,
        request.type_name,
    )
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())


async def _last_resort(rpc: str, exc: Exception, context: _Aborts) -> None:
    code = status_for(exc)
    _log(
        logging.ERROR,
        rpc,
        "unexpected",
        "unexpected %s at %s, answered %s",
        type(exc).__name__,
        _where(exc),
        code.name,
    )
    log.debug("%s: unexpected exception", rpc, exc_info=exc)
    detail = f"{type(exc).__name__}: {exc}"[:MAX_DETAIL]
    await context.abort(code, f"{rpc} could not handle this request ({detail})")


def _passes_through(exc: Exception) -> bool:
    """grpc's own control flow (abort, a finished call, a stopping server)."""
    return isinstance(exc, grpc.aio.BaseError)


async def _checked_stream(
    rpc: str, requests: AsyncIterator[Any], context: _Aborts
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(rpc, request, context)
        yield request
    # A message over the size limit ends the stream as a half-close would, and the call
    # is already dead: answering it at once races grpc's own close and grpc logs a
    # traceback for the failed send (measured: 4 in 200). A moment's wait lets grpc
    # cancel the handler first (0 in 600); a live stream loses only this moment.
    await asyncio.sleep(STREAM_END_SETTLE_S)


class _BoundedContext:
    """The servicer's context, with status messages cut to :data:`MAX_STATUS_CHARS`.

    A servicer that quotes its input (an unknown model, a worker's models) would
    otherwise send a status larger than clients accept (16 KiB of metadata): the
    client sees RESOURCE_EXHAUSTED from its own transport instead of the answer."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        await self._context.abort(code, bounded(details), trailing_metadata)

    def set_details(self, details: str) -> None:
        self._context.set_details(bounded(details))


def bounded(details: str) -> str:
    """``details`` cut to :data:`MAX_STATUS_CHARS` (percent-encoded, at most ~10 KB)."""
    if len(details) <= MAX_STATUS_CHARS:
        return details
    return details[: MAX_STATUS_CHARS - 1] + "\u2026"


def _guard(
    rpc: str, behavior: Callable[..., Any], request_streaming: bool
) -> Callable[..., Any] | None:
    """``behavior`` answering undecodable requests and unexpected exceptions; None for a
    synchronous behavior (grpc.aio runs those in threads; none is registered here)."""

    async def prepare(request: Any, context: _Aborts) -> Any:
        if request_streaming:
            return _checked_stream(rpc, request, context)
        if isinstance(request, Undecodable):
            await _refuse(rpc, request, context)
        return request

    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, raw: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            context = _BoundedContext(raw)
            request = await prepare(request, context)
            try:
                # aclosing: a wrapper closed by grpc closes the servicer's generator at once
                # (its finally releases slots), not whenever the garbage collector runs.
                responses = behavior(request, context)
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response
            except Exception as exc:
                if _passes_through(exc):
                    raise
                await _last_resort(rpc, exc, context)

        return streaming
    if inspect.iscoroutinefunction(behavior):

        async def unary(request: Any, raw: grpc.aio.ServicerContext) -> Any:
            context = _BoundedContext(raw)
            request = await prepare(request, context)
            try:
                return await behavior(request, context)
            except Exception as exc:
                if _passes_through(exc):
                    raise
                await _last_resort(rpc, exc, context)

        return unary
    return None


_FACTORIES: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def guard_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises and a guarded behavior."""
    attribute, factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    rpc = method.lstrip("/")
    guarded = _guard(rpc, behavior, handler.request_streaming) if behavior else None
    if guarded is None:
        return handler
    type_name = type_name_of(handler.request_deserializer, rpc)
    return factory(
        guarded,
        request_deserializer=safe_deserializer(handler.request_deserializer, type_name),
        response_serializer=handler.response_serializer,
    )


class DefinedStatus(grpc.aio.ServerInterceptor):
    """The server interceptor: every handler guarded (:func:`guard_handler`), once per method."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_handler(handler, method)
        self._cache[method] = (handler, guarded)
        return guarded
