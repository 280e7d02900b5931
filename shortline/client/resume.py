"""Stitching a stream back together after a retry.

A retried ``Generate`` with the same request id attaches to the same job on
the scheduler, which may send again text the caller has already seen. The
caller must see every character exactly once, so deltas are cut against the
count of characters already delivered.
"""

from __future__ import annotations


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
