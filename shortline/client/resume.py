"""Stitching a stream back together after a retry, and refusing to splice.

A retried ``Generate`` with the same request id attaches to the same job on
the scheduler, which sends again the text the caller has already seen, then
the rest. The caller must see every character exactly once, so deltas are cut
against the count of characters already delivered; and the replayed part must
be the text already delivered, character for character, or the scheduler is
not continuing the same generation (it started over after losing the job, or
sampled again) and the rest would be spliced onto another generation's start:
:class:`~shortline.client.types.StreamDivergedError` instead.
"""

from __future__ import annotations

import time

import grpc

from shortline.client.channel import is_retryable
from shortline.client.types import (
    Accepted,
    ClientOptions,
    Result,
    StreamClosedError,
    StreamDivergedError,
    accepted_from_pb,
    result_from_pb,
)
from shortline.scheduler.v1 import scheduler_pb2


class DeliveredText:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self._stream_offset = 0  # characters seen on the current attempt
        self.delivered = 0
        # The text delivered before the current attempt began, which its replay must
        # repeat exactly; "" on the first attempt (nothing to compare).
        self._before = ""

    def new_attempt(self) -> None:
        self._stream_offset = 0
        self._before = self.text

    def accept(self, text: str) -> str:
        """Returns the part of ``text`` not delivered yet, and records it.

        Raises StreamDivergedError when ``text`` replays a part already delivered
        with different characters."""
        start = self._stream_offset
        end = start + len(text)
        if start < len(self._before):
            overlap = min(end, len(self._before))
            replayed, known = text[: overlap - start], self._before[start:overlap]
            if replayed != known:
                pairs = zip(replayed, known, strict=True)
                first = next(i for i, (a, b) in enumerate(pairs) if a != b)
                raise StreamDivergedError(start + first)
        self._stream_offset = end
        if end <= self.delivered:
            return ""
        fresh = text[max(0, self.delivered - start) :]
        self.delivered += len(fresh)
        self._parts.append(fresh)
        return fresh

    def check_complete(self) -> None:
        """At the end of an attempt's text: raises StreamDivergedError when it ended
        before repeating all that was already delivered (a shorter generation)."""
        if self._stream_offset < len(self._before):
            raise StreamDivergedError(self._stream_offset)

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


class StreamState:
    """What one Generate stream has seen, across its retries (sync and asyncio alike)."""

    def __init__(self, request: scheduler_pb2.GenerateRequest, timeout: float | None) -> None:
        self.request = request
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delivered = DeliveredText()
        self.accepted: Accepted | None = None
        self.result: Result | None = None

    def remaining(self) -> float | None:
        """Seconds left of the caller's deadline, shared by every attempt."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def retry_after(
        self, exc: grpc.RpcError, attempt: int, options: ClientOptions, closed: bool
    ) -> float:
        """Seconds to wait before ``attempt`` (1 for the first retry) after ``exc`` ended
        the previous one; raises what the caller gets instead: StreamClosedError when
        the stream was closed, ``exc`` itself when it is not worth retrying or the
        retries are spent. One rule for the sync and the asyncio stream."""
        if closed:
            raise StreamClosedError(self.request.request_id) from exc
        if not is_retryable(exc) or attempt > options.retries:
            raise exc
        return options.backoff_seconds * (2 ** (attempt - 1))

    def handle(self, msg: scheduler_pb2.GenerateResponse) -> str:
        """Records one message; returns text not delivered before (may be empty).

        Raises StreamDivergedError (naming the request) when a retried stream is
        not the generation already delivered."""
        event = msg.WhichOneof("event")
        try:
            if event == "accepted":
                self.accepted = accepted_from_pb(msg.accepted)
            elif event == "delta":
                return self.delivered.accept(msg.delta.text)
            elif event == "result":
                self.delivered.check_complete()
                self.result = result_from_pb(msg.result)
        except StreamDivergedError as exc:
            raise StreamDivergedError(exc.offset, self.request.request_id) from None
        return ""
