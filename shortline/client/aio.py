"""asyncio client, for services built on asyncio.

``close()`` cancels every open stream itself before closing the channel:
``grpc.aio.Channel.close()`` cancels only calls it finds as asyncio tasks
created by the call, not a stream read with ``async for`` from the caller's
own task (grpc/grpc#32005), so such a stream stays open and keeps being served
after the channel is closed, and the scheduler never learns the client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any

import grpc

from shortline.client import tracing
from shortline.client.channel import aio_channel, call_metadata
from shortline.client.resume import StreamState
from shortline.client.types import (
    Accepted,
    ClientOptions,
    Message,
    Result,
    StreamClosedError,
    StreamDivergedError,
    build_request,
    state_name,
)
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc


class AsyncGenerateStream:
    """``async for text in stream``; ``result`` is set once the stream ends.

    Retries and divergence as :class:`~shortline.client.sync.GenerateStream`.
    :meth:`close`, closing the client, or cancelling the reading task cancels
    the call at once, so the scheduler frees the slot."""

    def __init__(
        self,
        client: AsyncShortlineClient,
        request: scheduler_pb2.GenerateRequest,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._state = StreamState(request, timeout)
        self._call: Any = None  # the attempt's call while it streams
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._state.request.request_id

    @property
    def text(self) -> str:
        return self._state.delivered.text

    @property
    def accepted(self) -> Accepted | None:
        return self._state.accepted

    @property
    def result(self) -> Result | None:
        return self._state.result

    async def __aiter__(self) -> AsyncIterator[str]:
        options = self._client.options
        state = self._state
        attempt = 0
        self._closed = False
        self._client._streams.add(self)
        request = state.request
        span = tracing.start_span(request.request_id, request.model, request.max_tokens)
        error: Exception | None = None
        try:
            while True:
                if self._closed:  # closed while waiting to retry
                    raise StreamClosedError(self.request_id)
                state.delivered.new_attempt()
                try:
                    with tracing.current(span):
                        self._call = call = self._client.stub.Generate(
                            request,
                            timeout=state.remaining(),
                            metadata=tracing.with_context(span, call_metadata(options)),
                        )
                    async for msg in call:
                        fresh = state.handle(msg)
                        if fresh:
                            yield fresh
                    return
                except asyncio.CancelledError:
                    # grpc.aio raises CancelledError in the reader of a call cancelled
                    # locally; a task that was not itself cancelled gets an error instead.
                    task = asyncio.current_task()
                    if self._closed and task is not None and not task.cancelling():
                        raise StreamClosedError(self.request_id) from None
                    raise
                except grpc.aio.AioRpcError as exc:
                    attempt += 1
                    delay = state.retry_after(exc, attempt, options, self._closed)
                    tracing.retried(span, exc, attempt)
                    await asyncio.sleep(delay)
                except StreamDivergedError:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self.cancel()  # a diverged job is of no use to this caller
                    raise
        except Exception as exc:
            error = exc
            raise
        finally:
            self.close()
            self._client._streams.discard(self)
            tracing.end(span, state.result, error)

    def close(self) -> None:
        """Ends this stream now (the scheduler frees the slot of a request that is not
        reattachable); the job itself is cancelled only by :meth:`cancel`. A reader
        still iterating gets StreamClosedError."""
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def collect(self) -> str:
        """Reads the whole stream; returns the text."""
        async for _ in self:
            pass
        return self.text

    async def cancel(self) -> str:
        return await self._client.cancel(self.request_id)


class AsyncShortlineClient:
    """``async with AsyncShortlineClient(ClientOptions(target=...)) as client: ...``"""

    def __init__(self, options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions()
        self._channel = aio_channel(self.options)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        self._streams: weakref.WeakSet[AsyncGenerateStream] = weakref.WeakSet()

    def generate(
        self,
        prompt: str = "",
        *,
        messages: Iterable[Message] | None = None,
        model: str = "smollm2-135m-instruct",
        max_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        ignore_eos: bool = False,
        priority: int | None = None,
        length_model: str = "",
        length_hint: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        request = build_request(
            prompt,
            messages=messages,
            request_id=request_id or uuid.uuid4().hex,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            ignore_eos=ignore_eos,
            priority=priority,
            length_model=length_model,
            reattach_grace_seconds=self.options.reattach_grace_seconds,
            length_hint=length_hint,
        )
        return AsyncGenerateStream(self, request, timeout or self.options.timeout_seconds)

    async def cancel(self, request_id: str) -> str:
        response = await self.stub.Cancel(
            scheduler_pb2.CancelRequest(request_id=request_id),
            timeout=self.options.timeout_seconds,
            metadata=call_metadata(self.options),
        )
        return state_name(response.state)

    async def stats(self) -> scheduler_pb2.GetStatsResponse:
        response: scheduler_pb2.GetStatsResponse = await self.stub.GetStats(
            scheduler_pb2.GetStatsRequest(),
            timeout=self.options.timeout_seconds,
            metadata=call_metadata(self.options),
        )
        return response

    async def close(self) -> None:
        """Cancels every open stream (see the module's docstring), then closes the
        channel: the scheduler sees each stream end at once and frees its slot
        (unless the request is reattachable)."""
        for stream in list(self._streams):
            stream.close()
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncShortlineClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
