"""The StreamDeltas stream: every running job's deltas on one stream per scheduler.

A gRPC message costs the scheduler about the same whatever it carries (most of
it gRPC's own callbacks on its event loop), so a job's chunks, one message each
on its own ``Execute`` stream, were half of what the scheduler spent per chunk.
A scheduler opens one ``StreamDeltas`` stream per worker and names it in each
``ExecuteRequest`` (``delta_stream``); the worker then puts that job's deltas
here instead of on ``Execute``, and the sender writes whatever is waiting, of
every job, as one message. A delta waits at most ``GATHER_S`` for others to
join it, except a job's first and what waits when a job ends (``urgent``):
those go at once, with whatever else waits, so time to first token and the
time of the result do not move, and a chunk arrives at most ``GATHER_S`` later
(10 ms behind the coalescing's 100). At the per-stream rates of a loaded pool
(30-100 tokens/s, a chunk per stream every 100 ms), one message then carries
the chunks of about slots x 10 ms / 100 ms streams instead of one.

Order: one stream, one FIFO, so each job's deltas arrive in the order they were
put, which is the order ``Execute`` would have sent them. ``Execute``'s result
says how many were put (``ExecuteResult.streamed_deltas``): the scheduler
applies the result only after that many, so a stop's exact prefix and the
token counts hold although the result travels on another stream. If this
stream ends (the scheduler's side went away), the deltas put for it are lost
and the scheduler, whose stream broke, resumes those jobs from what it had.

Bounded: at most ``MAX_STREAMS`` streams (a scheduler restarted opens a new
one and the old one ends with its connection); what waits is bounded by the
slots times one chunk each, since a job puts a chunk only as fast as it
generates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from shortline.worker.v1 import worker_pb2

GATHER_S = 0.010
MAX_STREAMS = 8
MAX_STREAM_ID = 64


class StreamLimit(Exception):
    """More open streams than ``MAX_STREAMS`` (RESOURCE_EXHAUSTED)."""


class _Outbox:
    __slots__ = ("closed", "hurry", "pending", "urgent", "wake")

    def __init__(self) -> None:
        self.pending: list[worker_pb2.JobDelta] = []
        self.wake = asyncio.Event()
        self.closed = False
        self.urgent = False  # send what waits now, without gathering
        self.hurry: asyncio.Future[None] | None = None  # the gathering's wait, if any

    def flush_now(self) -> None:
        self.urgent = True
        if self.hurry is not None and not self.hurry.done():
            self.hurry.set_result(None)


class DeltaStreams:
    """The open streams by id; ``put`` from the Execute handlers, ``serve`` the sender."""

    def __init__(self, gather_s: float = GATHER_S) -> None:
        self.gather_s = gather_s
        self._open: dict[str, _Outbox] = {}

    def has(self, stream_id: str) -> bool:
        return bool(stream_id) and stream_id in self._open

    def put(
        self, stream_id: str, job_id: str, delta: worker_pb2.TextDelta, urgent: bool = False
    ) -> bool:
        """Queues ``delta`` on the stream (``urgent``: sent without gathering); False when
        it is not open (lost: its scheduler resumes the job from what it received)."""
        box = self._open.get(stream_id)
        if box is None or box.closed:
            return False
        box.pending.append(worker_pb2.JobDelta(job_id=job_id, delta=delta))
        if urgent:
            box.flush_now()
        box.wake.set()
        return True

    def flush(self, stream_id: str) -> None:
        """Sends what waits on the stream now (a job ended: its result is on its way)."""
        box = self._open.get(stream_id)
        if box is not None and box.pending:
            box.flush_now()

    def close_all(self) -> None:
        """Ends every stream after what waits on it (the worker stops: its jobs are over,
        and a stream left open would hold the server's shutdown for its whole grace)."""
        for box in self._open.values():
            box.closed = True
            box.flush_now()
            box.wake.set()

    async def serve(self, stream_id: str) -> AsyncIterator[worker_pb2.StreamDeltasResponse]:
        """The stream's messages: an empty one (open), then batches of waiting deltas.
        Raises ValueError for a bad id, StreamLimit when too many are open."""
        if not 1 <= len(stream_id) <= MAX_STREAM_ID:
            raise ValueError(f"stream_id must be 1..{MAX_STREAM_ID} characters")
        if stream_id not in self._open and len(self._open) >= MAX_STREAMS:
            raise StreamLimit(f"{MAX_STREAMS} delta streams are open already")
        box = self._open[stream_id] = _Outbox()
        loop = asyncio.get_running_loop()
        try:
            yield worker_pb2.StreamDeltasResponse()
            while True:
                await box.wake.wait()
                box.wake.clear()
                if not box.urgent and self.gather_s > 0:
                    box.hurry = loop.create_future()
                    timer = loop.call_later(self.gather_s, _done, box.hurry)
                    try:
                        await box.hurry
                    finally:
                        timer.cancel()
                        box.hurry = None
                box.urgent = False
                box.wake.clear()  # what came while gathering goes in this batch
                batch, box.pending = box.pending, []
                if batch:
                    yield worker_pb2.StreamDeltasResponse(deltas=batch)
                if box.closed:
                    return
        finally:
            if self._open.get(stream_id) is box:
                del self._open[stream_id]


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
