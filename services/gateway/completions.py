"""``POST /v1/completions``: one scheduler ``Generate`` per request, streamed or whole.

The HTTP status is decided by the scheduler's first answer: the response
starts only with the first text (or the end), so a refusal before any text
(unknown model, bad parameter, queue full, a deadline that cannot be met)
comes back as its own status (404, 400, 429, 504), not as a 200 followed by an
error. An error after text was sent ends the stream with an ``error`` event,
which OpenAI clients raise.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.types import Send

from services.gateway import http
from services.gateway.clients import ClientPool
from services.gateway.errors import ApiError, from_rpc
from services.gateway.params import CompletionParams
from shortline.client import AsyncGenerateStream, AsyncShortlineClient, ClientError, Result
from shortline.client.types import build_request

FINISH_REASONS = ("stop", "length")


@dataclass
class Limiter:
    """Requests in flight, at most ``limit`` (429 above: the gateway's own queue is none)."""

    limit: int
    inflight: int = 0

    def take(self) -> None:
        if self.inflight >= self.limit:
            raise ApiError(
                429,
                f"the gateway has {self.limit} requests in flight (its --max-concurrent)",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                retry_after_s=1.0,
            )
        self.inflight += 1

    def give(self) -> None:
        self.inflight -= 1


def open_stream(
    client: AsyncShortlineClient, p: CompletionParams, request_id: str, timeout: float
) -> AsyncGenerateStream:
    """The SDK stream for ``p``; fields the SDK's ``generate`` does not take yet (stop,
    seed, top_k, repetition_penalty) are set on the request it builds."""
    request = build_request(
        p.prompt,
        messages=p.messages or None,
        request_id=request_id,
        model=p.model,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        ignore_eos=p.ignore_eos,
        priority=p.priority,
        length_model=p.length_model,
        length_hint=p.length_hint,
        reattach_grace_seconds=client.options.reattach_grace_seconds,
    )
    sampling = request.sampling
    sampling.stop.extend(p.stop)
    if p.seed is not None:
        sampling.seed = p.seed
    if p.top_k is not None:
        sampling.top_k = p.top_k
    if p.repetition_penalty is not None:
        sampling.repetition_penalty = p.repetition_penalty
    return AsyncGenerateStream(client, request, timeout)


def _finish_reason(result: Result | None) -> str:
    if result is None:
        raise ApiError(502, "the scheduler's stream ended without a result", type="server_error")
    if result.finish_reason not in FINISH_REASONS:
        status = 504 if result.finish_reason == "deadline_exceeded" else 500
        raise ApiError(status, f"the generation ended: {result.finish_reason}", type="server_error")
    return result.finish_reason


def _usage(result: Result | None) -> dict[str, int]:
    # The prompt's tokens as the model counted them (GenerateResult.prompt_tokens: after
    # the chat template; 0 from a model that does not report it, see docs/gateway.md).
    if result is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    prompt, completion = result.prompt_tokens, result.actual_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _headers(stream: AsyncGenerateStream, *, done: bool) -> dict[str, str]:
    """Shortline's view of the request, for those who want it (x-shortline-*)."""
    head = {"x-request-id": stream.request_id}
    accepted = stream.accepted
    if accepted is not None:
        head["x-shortline-predicted-tokens"] = f"{accepted.predicted_tokens:.1f}"
        head["x-shortline-prediction-source"] = accepted.prediction_source
        head["x-shortline-queue-position"] = str(accepted.queue_position)
        if accepted.head_version:
            head["x-shortline-head-version"] = accepted.head_version
    result = stream.result
    if done and result is not None:
        head["x-shortline-queue-wait-ms"] = f"{result.queue_wait_seconds * 1e3:.1f}"
        head["x-shortline-time-to-first-token-ms"] = (
            f"{result.time_to_first_token_seconds * 1e3:.1f}"
        )
        head["x-shortline-worker"] = result.worker_id
    return head


class Completion:
    """One request's answer, produced inside :class:`~services.gateway.http.Exchange`.

    ``/v1/completions``'s shapes; :class:`services.gateway.chat.ChatCompletion`
    overrides the ones chat shapes differently (``_body``, ``_choice``, ``_chunk``,
    ``_opening``)."""

    PREFIX = "cmpl-"
    OBJECT = "text_completion"
    CHUNK_OBJECT = "text_completion"

    def __init__(
        self,
        params: CompletionParams,
        token: str | None,
        pool: ClientPool,
        limiter: Limiter,
        timeout: float,
        request_id: str | None = None,
    ) -> None:
        self.params = params
        self.token = token
        self.pool = pool
        self.limiter = limiter
        self.timeout = params.deadline_seconds or timeout
        self.request_id = request_id or uuid.uuid4().hex
        self.id = f"{self.PREFIX}{self.request_id}"
        self.created = int(time.time())

    def _body(
        self, choices: list[dict[str, Any]], usage: dict[str, int] | None, *, chunk: bool = False
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": self.CHUNK_OBJECT if chunk else self.OBJECT,
            "created": self.created,
            "model": self.params.model,
            "choices": choices,
        }
        if usage is not None or not self.params.stream:
            body["usage"] = usage
        return body

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """The whole answer's choice."""
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _delta(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        """A stream chunk's choice (the same shape for completions)."""
        return self._choice(text, finish_reason)

    async def __call__(self, send: Send) -> None:
        try:
            self.limiter.take()
        except ApiError as exc:
            await http.send_error(send, exc)
            return
        try:
            async with self.pool.client(self.token) as client:
                stream = open_stream(client, self.params, self.request_id, self.timeout)
                if self.params.stream:
                    await self._stream(send, stream)
                else:
                    await self._whole(send, stream)
        except grpc.RpcError:
            pass  # answered already; re-raised only for the pool to see the status
        finally:
            self.limiter.give()

    async def _whole(self, send: Send, stream: AsyncGenerateStream) -> None:
        try:
            text = await stream.collect()
            finish = _finish_reason(stream.result)
        except grpc.RpcError as exc:
            await http.send_error(send, from_rpc(exc), {"x-request-id": self.request_id})
            raise
        except (ApiError, ClientError) as exc:
            await http.send_error(send, _api_error(exc), {"x-request-id": self.request_id})
            return
        body = self._body([self._choice(text, finish)], _usage(stream.result))
        await http.send_json(send, 200, body, _headers(stream, done=True))

    async def _stream(self, send: Send, stream: AsyncGenerateStream) -> None:
        texts = aiter(stream)
        try:
            first: str | None = await anext(texts)
        except StopAsyncIteration:
            first = None
        except grpc.RpcError as exc:
            await http.send_error(send, from_rpc(exc), {"x-request-id": self.request_id})
            raise
        except ClientError as exc:
            await http.send_error(send, _api_error(exc), {"x-request-id": self.request_id})
            return
        await http.start_events(send, _headers(stream, done=False))
        try:
            for opening in self._opening():
                await http.send_event(send, opening)
            if first is not None:
                await http.send_event(send, self._chunk(first))
                async for text in texts:
                    await http.send_event(send, self._chunk(text))
            finish = _finish_reason(stream.result)
        except (grpc.RpcError, ApiError, ClientError) as exc:
            # Mid-stream: the status is sent; OpenAI clients raise an "error" event.
            await http.send_event(send, _api_error(exc).body())
            await http.end_events(send)
            return
        await http.send_event(send, self._chunk("", finish))
        if self.params.include_usage:
            await http.send_event(send, self._body([], _usage(stream.result), chunk=True))
        await http.end_events(send)

    def _opening(self) -> list[dict[str, Any]]:
        """Chunks sent before the first text (none for completions)."""
        return []

    def _chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        body = self._body([self._delta(text, finish_reason)], None, chunk=True)
        if self.params.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the usage chunk
        return body


def _api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return from_rpc(exc)
    return ApiError(502, f"the scheduler's stream failed: {exc}", type="server_error")
