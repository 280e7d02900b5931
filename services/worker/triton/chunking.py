"""Streamed tokens sent in chunks by the model itself, when the client asks.

Reading a streamed response costs the worker about 150 microseconds of CPU
whatever it carries (gRPC's Python layer per message: ``python -m
bench.relay.transport``), and sending one costs the Python-backend stub about as
much again. A client that counts tokens per response (``return_num_output_tokens``)
may therefore ask the model for chunks: ``stream_interval_ms`` and
``stream_max_tokens`` (optional UINT32 inputs, ours; Triton's vLLM backend has
neither, and the worker sends them only to a model that declares them).

The rule is the worker's coalescing rule (``services/worker/service/coalesce.py``),
applied where the tokens are made: the first token of a stream goes out at once
(time to first token unchanged), then what accumulated once ``interval`` has passed
since the last send or ``max_tokens`` are waiting, and the rest with the final
response. No timer: a chunk is sent when a token arrives and finds it due, so a
token is never held longer than the gap to the next one plus the interval, and a
stream slower than the interval goes out token by token as before. A cancelled
stream drops what it held (its client is gone or stopped taking).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Chunker:
    """Accumulates one stream's tokens; ``add`` returns a chunk to send, or None.

    ``interval_s <= 0`` or ``max_tokens <= 1`` sends every token as it comes."""

    interval_s: float
    max_tokens: int
    clock: Callable[[], float] = time.monotonic
    _parts: list[str] = field(default_factory=list)
    _tokens: int = 0
    _last_sent: float | None = None

    def add(self, text: str, tokens: int, final: bool) -> tuple[str, int] | None:
        self._parts.append(text)
        self._tokens += tokens
        now = self.clock()
        due = (
            final
            or self._last_sent is None
            or self.interval_s <= 0
            or self.max_tokens <= 1
            or self._tokens >= self.max_tokens
            or now - self._last_sent >= self.interval_s
        )
        if not due:
            return None
        chunk = ("".join(self._parts), self._tokens)
        self._parts, self._tokens, self._last_sent = [], 0, now
        return chunk
