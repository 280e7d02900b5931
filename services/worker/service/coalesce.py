"""Fewer, larger messages on the hot path: Triton's per-token chunks, merged.

Every message costs the worker, the scheduler and the client the same CPU
whatever it carries, so a stream's tokens are sent in chunks: the first at
once (time to first token unchanged), then whatever arrived once ``interval_s``
has passed since the last send or ``max_tokens`` tokens are waiting, and the
rest at the end. A client sees text at most ``interval_s`` later than it was
generated (plus the time of one token when tokens come slower than that).

A reader task consumes the Triton stream and only appends to a buffer; the
sender (the ``Execute`` generator) sleeps until the first token, the next send
time, enough tokens, or the end, so a token costs an append, not a wake-up.
What the reader took is added to ``Execution.text``/``tokens`` at once, and the
reader stops taking at the stop flag (Cancel, Preempt): the sender's last chunk
before the result carries exactly what ``Execution.text`` holds, so a stop's
answer and the stream agree. An error from Triton is raised after the text that
came before it has been sent (the scheduler resumes from that text).

``interval_s <= 0`` turns coalescing off: each chunk goes out as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from services.worker.service.slots import Execution
from services.worker.service.triton_client import Chunk


@dataclass
class _Buffer:
    """What the reader took and the sender has not sent yet."""

    text: list[str]
    tokens: int = 0
    step: int = 0
    batch_size: int = 0
    finish_reason: str = ""
    ended: bool = False
    error: BaseException | None = None

    def take(self) -> Chunk:
        chunk = Chunk(
            text="".join(self.text),
            tokens=self.tokens,
            step=self.step,
            batch_size=self.batch_size,
            finish_reason=self.finish_reason,
            final=self.ended,
        )
        self.text, self.tokens, self.finish_reason = [], 0, ""
        return chunk


def _take(execution: Execution, chunk: Chunk) -> bool:
    """Adds ``chunk`` to what ``execution`` has taken; False (nothing taken) once a stop
    was asked: the stop's answer is what was taken before it."""
    if execution.stop_reason is not None:
        return False
    execution.text += chunk.text
    execution.tokens += chunk.tokens
    if chunk.prompt_tokens > execution.prompt_tokens:
        execution.prompt_tokens = chunk.prompt_tokens
    return True


async def chunks(
    stream: AsyncIterable[Chunk], execution: Execution, interval_s: float, max_tokens: int
) -> AsyncIterator[Chunk]:
    """The stream's chunks, merged (see the module docstring); ``execution`` keeps what
    was taken. Raises what the stream raised, after the text before it."""
    if interval_s <= 0:
        async for chunk in stream:
            if not _take(execution, chunk):
                return
            yield chunk
        return
    loop = asyncio.get_running_loop()
    buffer = _Buffer(text=[])
    waiter: asyncio.Future[None] | None = None
    wake_at_tokens = 1  # the first token goes out at once

    def wake() -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read() -> None:
        try:
            async for chunk in stream:
                if not _take(execution, chunk):
                    break
                buffer.text.append(chunk.text)
                buffer.tokens += chunk.tokens
                buffer.step, buffer.batch_size = chunk.step, chunk.batch_size
                buffer.finish_reason = chunk.finish_reason or buffer.finish_reason
                if buffer.tokens >= wake_at_tokens:
                    wake()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if execution.stop_reason is None or (task is not None and task.cancelling()):
                raise
            # Our own Cancel/Preempt cancelled the Triton call: a normal end.
        except Exception as exc:  # raised by the sender, after the text before it
            buffer.error = exc
        finally:
            buffer.ended = True
            wake()

    reader = asyncio.create_task(read())
    last_sent = 0.0
    try:
        while True:
            now = time.monotonic()
            due = last_sent + interval_s
            if buffer.ended or buffer.tokens >= max_tokens or (buffer.tokens and now >= due):
                if buffer.text or buffer.finish_reason:
                    last_sent = now
                    yield buffer.take()
                if buffer.ended and not buffer.text:
                    break
                continue
            # Nothing due yet. With nothing waiting, wake at the next token (the first of a
            # stream goes out at once; a later one arms the send time); with some waiting,
            # at the send time, at enough tokens, or at the end: two wake-ups per chunk at
            # most, however many tokens it carries.
            wake_at_tokens = max_tokens if buffer.tokens else 1
            waiter = loop.create_future()
            timer = loop.call_later(due - now, wake) if buffer.tokens else None
            try:
                await waiter
            finally:
                waiter = None
                if timer is not None:
                    timer.cancel()
        if buffer.error is not None:
            raise buffer.error
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
