"""Stitching a stream back together after a retry.

A retried ``Generate`` with the same request id attaches to the same job on
the scheduler, which may send again text the caller has already seen. The
caller must see every character exactly once, so deltas are cut against the
count of characters already delivered.
"""

from __future__ import annotations

import time

from shortline.client.types import Accepted, Result, accepted_from_pb, result_from_pb
from shortline.scheduler.v1 import scheduler_pb2


class DeliveredText:
    def __init__(self) -> None:
        self._parts: list[str] = []
        self._stream_offset = 0  # characters seen on the current attempt
        self.delivered = 0

    def new_attempt(self) -> None:
        self._stream_offset = 0

    def accept(self, text: str) -> str:
        """Returns the part of ``text`` not delivered yet, and records it."""
        start = self._stream_offset
        self._stream_offset += len(text)
        if self._stream_offset <= self.delivered:
            return ""
        fresh = text[max(0, self.delivered - start) :]
        self.delivered += len(fresh)
        self._parts.append(fresh)
        return fresh

    @property
    def text(self) -> str:
        return "".join(self._parts)


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

    def backoff(self, base_seconds: float, attempt: int) -> float:
        return base_seconds * (2 ** (attempt - 1))

    def handle(self, msg: scheduler_pb2.GenerateResponse) -> str:
        """Records one message; returns text not delivered before (may be empty)."""
        event = msg.WhichOneof("event")
        if event == "accepted":
            self.accepted = accepted_from_pb(msg.accepted)
        elif event == "delta":
            return self.delivered.accept(msg.delta.text)
        elif event == "result":
            self.result = result_from_pb(msg.result)
        return ""
