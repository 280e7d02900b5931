"""Blocking client for services that are not asyncio."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc

from shortline.client import tracing
from shortline.client.channel import call_metadata, sync_channel
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


class GenerateStream:
    """Iterates over text deltas; ``result`` is set once the stream ends.

    Retries on UNAVAILABLE reuse the request id, so the scheduler attaches to
    the same job instead of running it again (when the request is reattachable:
    ``ClientOptions.reattach_grace_seconds``), and text already yielded is not
    yielded twice; a retry that replays different text raises
    :class:`~shortline.client.types.StreamDivergedError`.

    Leaving the loop early (``break``, an exception), :meth:`close` or closing the
    client cancels the call at once, so the scheduler frees the slot.
    """

    def __init__(
        self,
        client: ShortlineClient,
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

    def __iter__(self) -> Iterator[str]:
        options = self._client.options
        state = self._state
        attempt = 0
        self._closed = False
        self._client._track(self, True)
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
                    for msg in call:
                        fresh = state.handle(msg)
                        if fresh:
                            yield fresh
                    return
                except grpc.RpcError as exc:
                    attempt += 1
                    delay = state.retry_after(exc, attempt, options, self._closed)
                    tracing.retried(span, exc, attempt)
                    time.sleep(delay)
                except StreamDivergedError:
                    self._cancel_job()
                    raise
        except Exception as exc:
            error = exc
            raise
        finally:
            self.close()
            self._client._track(self, False)
            tracing.end(span, state.result, error)

    def close(self) -> None:
        """Ends this stream now (the scheduler frees the slot of a request that is not
        reattachable); the job itself is cancelled only by :meth:`cancel`. A reader
        still iterating gets StreamClosedError."""
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _cancel_job(self) -> None:
        """Best effort: a job whose text diverged is of no use to this caller."""
        with contextlib.suppress(grpc.RpcError):
            self.cancel()

    def cancel(self) -> str:
        """Cancels the job on the scheduler (not just this stream); returns its state."""
        return self._client.cancel(self.request_id)


class ShortlineClient:
    """``with ShortlineClient(ClientOptions(target=...)) as client: ...``"""

    def __init__(self, options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions()
        self._channel = sync_channel(self.options)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)
        # Open streams, for close(); streams may be read from several threads.
        self._streams: weakref.WeakSet[GenerateStream] = weakref.WeakSet()
        self._lock = threading.Lock()

    def _track(self, stream: GenerateStream, open_: bool) -> None:
        with self._lock:
            if open_:
                self._streams.add(stream)
            else:
                self._streams.discard(stream)

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
    ) -> GenerateStream:
        """Starts a generation of ``prompt``, or of ``messages`` (a conversation, e.g.
        ``[{"role": "user", "content": "Hi"}]``, which the worker formats with the
        model's chat template); iterate the returned stream for text."""
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
        return GenerateStream(self, request, timeout or self.options.timeout_seconds)

    def cancel(self, request_id: str) -> str:
        response = self.stub.Cancel(
            scheduler_pb2.CancelRequest(request_id=request_id),
            timeout=self.options.timeout_seconds,
            metadata=call_metadata(self.options),
        )
        return state_name(response.state)

    def stats(self) -> scheduler_pb2.GetStatsResponse:
        response: scheduler_pb2.GetStatsResponse = self.stub.GetStats(
            scheduler_pb2.GetStatsRequest(),
            timeout=self.options.timeout_seconds,
            metadata=call_metadata(self.options),
        )
        return response

    def close(self) -> None:
        """Cancels every open stream, then closes the channel: the scheduler sees each
        stream end at once and frees its slot (unless the request is reattachable)."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        self._channel.close()

    def __enter__(self) -> ShortlineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
