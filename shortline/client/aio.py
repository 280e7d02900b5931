"""asyncio client, for services built on asyncio."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import TracebackType

import grpc

from shortline.client.channel import aio_channel, call_metadata, is_retryable
from shortline.client.resume import StreamState
from shortline.client.types import Accepted, ClientOptions, Result, build_request, state_name
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc


class AsyncGenerateStream:
    """``async for text in stream``; ``result`` is set once the stream ends."""

    def __init__(
        self,
        client: AsyncShortlineClient,
        request: scheduler_pb2.GenerateRequest,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._state = StreamState(request, timeout)

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
        while True:
            state.delivered.new_attempt()
            try:
                call = self._client.stub.Generate(
                    state.request, timeout=state.remaining(), metadata=call_metadata(options)
                )
                async for msg in call:
                    fresh = state.handle(msg)
                    if fresh:
                        yield fresh
                return
            except grpc.aio.AioRpcError as exc:
                if not is_retryable(exc) or attempt >= options.retries:
                    raise
                attempt += 1
                await asyncio.sleep(state.backoff(options.backoff_seconds, attempt))

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

    def generate(
        self,
        prompt: str,
        *,
        model: str = "smollm2-135m-instruct",
        max_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        ignore_eos: bool = False,
        priority: int | None = None,
        length_model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        request = build_request(
            prompt,
            request_id=request_id or uuid.uuid4().hex,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            ignore_eos=ignore_eos,
            priority=priority,
            length_model=length_model,
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
