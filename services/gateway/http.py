"""ASGI plumbing: bounded bodies, JSON and SSE sends, and answering while watching
for the client to leave.

Starlette's own StreamingResponse notices a client that left only when a send
fails (ASGI 2.4 servers such as uvicorn), that is never while a request waits
in the scheduler's queue with nothing to send: the slot would stay taken until
the first token. :class:`Exchange` instead listens for ``http.disconnect`` the
whole time and cancels the work at once, which cancels the scheduler call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.gateway.errors import ApiError

log = logging.getLogger("shortline.gateway")

Produce = Callable[[Send], Awaitable[None]]


class Exchange(Response):
    """A response produced by ``produce(send)``, cancelled if the client disconnects."""

    def __init__(self, produce: Produce) -> None:
        self._produce = produce
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                log.debug("client disconnected; cancelling its request")
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self._produce(send)
            finally:
                group.cancel_scope.cancel()


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 above ``limit`` bytes (checked while reading), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_json(
    send: Send, status: int, body: Any, headers: Mapping[str, str] | None = None
) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = {"content-type": "application/json", "content-length": str(len(data))}
    head.update(headers or {})
    await send({"type": "http.response.start", "status": status, "headers": _raw(head)})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def send_error(send: Send, error: ApiError, headers: Mapping[str, str] | None = None) -> None:
    head = dict(headers or {})
    head.update(error.headers())
    if error.status == 501:
        head["x-should-retry"] = "false"  # OpenAI clients retry 5xx unless told not to
    await send_json(send, error.status, error.body(), head)


async def start_events(send: Send, headers: Mapping[str, str]) -> None:
    head = {"content-type": "text/event-stream", "cache-control": "no-cache"}
    head.update(headers)
    await send({"type": "http.response.start", "status": 200, "headers": _raw(head)})


async def send_event(send: Send, data: Any) -> None:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    await send(
        {"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True}
    )


async def end_events(send: Send) -> None:
    await send_event(send, "[DONE]")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def error_response(error: ApiError) -> Response:
    head = error.headers()
    if error.status == 501:
        head["x-should-retry"] = "false"
    return Response(error.json(), error.status, headers=head, media_type="application/json")
