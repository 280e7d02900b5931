"""asyncio client, for services built on asyncio."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from types import TracebackType

import grpc

from shortline.client.channel import aio_channel, call_metadata, is_retryable
from shortline.client.resume import DeliveredText
from shortline.client.types import (
    Accepted,
    ClientOptions,
    Result,
    accepted_from_pb,
    build_request,
    result_from_pb,
    state_name,
)
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
        self._request = request
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._text = DeliveredText()
        self.accepted: Accepted | None = None
        self.result: Result | None = None

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def text(self) -> str:
        return self._text.text

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    async def __aiter__(self) -> AsyncIterator[str]:
        options = self._client.options
        attempt = 0
        while True:
            self._text.new_attempt()
            try:
                call = self._client.stub.Generate(
                    self._request,
                    timeout=self._remaining(),
                    metadata=call_metadata(options),
                )
                async for msg in call:
                    event = msg.WhichOneof("event")
                    if event == "accepted":
                        self.accepted = accepted_from_pb(msg.accepted)
                    elif event == "delta":
                        fresh = self._text.accept(msg.delta.text)
                        if fresh:
                            yield fresh
                    elif event == "result":
                        self.result = result_from_pb(msg.result)
                return
            except grpc.aio.AioRpcError as exc:
                if not is_retryable(exc) or attempt >= options.retries:
                    raise
                attempt += 1
                await asyncio.sleep(options.backoff_seconds * (2 ** (attempt - 1)))

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
