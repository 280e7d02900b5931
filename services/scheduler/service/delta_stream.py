"""One worker's StreamDeltas stream: every run's deltas on one stream, several a message.

Why: each gRPC message costs the scheduler about the same whatever it carries
(mostly gRPC's own callbacks on the event loop, docs/scaling.md), and a run's
chunks each came as one message on its own ``Execute`` stream. On this stream
the worker sends whatever deltas of all its runs are waiting as one message;
``Execute`` then carries only the run's result, which says how many deltas went
this way (``ExecuteResult.streamed_deltas``). A run applies its result only
once it has applied that many (:meth:`RunSink.caught_up`): the two streams are
not ordered with each other, and the exact-prefix stop, the resume text and the
token counts need every delta before the end.

A run names the stream in its ``ExecuteRequest`` only while the stream is open
(the worker's first, empty message said so); otherwise, and with a worker that
predates the RPC (UNIMPLEMENTED: never asked again), its deltas come on
``Execute`` as before. If the stream breaks, every run attached to it is failed
as if its ``Execute`` had (:meth:`RunSink.fail` cancels the call): the job
resumes from the text applied so far, exactly what its clients were sent, and
the stream is opened again (a new id) after ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import grpc

from services.scheduler.core.job import JobState
from services.scheduler.service.streams import Request
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

RETRY_S = 1.0
# A result whose deltas have not all arrived this long after it: the run broke.
CATCH_UP_S = 10.0


class DeltasLost(Exception):
    """The stream carrying a run's deltas broke (or never brought them all)."""


def applier(
    req: Request,
    token: int,
    worker_id: str,
    on_progress: Callable[[str, int], None],
    count: Callable[[int], None],
) -> Callable[[worker_pb2.TextDelta], None]:
    """What a run does with each of its deltas, whichever stream brought it: adds it to
    the request's text (journaled, then published), tells the core, counts the tokens.
    Nothing for a stale run (its Execute loop cancels it) or a cancelled job."""
    job = req.job

    def apply(d: worker_pb2.TextDelta) -> None:
        if job.run_token != token or job.worker != worker_id or job.state is JobState.CANCELLED:
            return
        req.add_text(d.text, d.tokens)
        on_progress(job.id, req.tokens)
        count(d.tokens)

    return apply


def lost_in_transit(sink: RunSink | None, exc: BaseException) -> bool:
    """Whether ``exc`` in a run means its deltas were lost on the way (the run broke and
    resumes), not that its task was cancelled (its worker is gone, the job requeued)."""
    if isinstance(exc, DeltasLost):
        return True
    task = asyncio.current_task()
    cancelled = task is not None and task.cancelling() > 0
    return sink is not None and sink.broken and not cancelled


class RunSink:
    """One run's place on the stream: applies its deltas in order, counts them."""

    __slots__ = ("_apply", "_waiter", "broken", "call", "expected", "received")

    def __init__(self, apply: Callable[[worker_pb2.TextDelta], None]) -> None:
        self._apply = apply
        self.received = 0
        self.expected = 0
        self.broken = False
        self.call: Any = None  # the run's Execute call, cancelled when the stream breaks
        self._waiter: asyncio.Future[bool] | None = None

    def deliver(self, delta: worker_pb2.TextDelta) -> None:
        self.received += 1
        self._apply(delta)
        waiter = self._waiter
        if waiter is not None and self.received >= self.expected and not waiter.done():
            waiter.set_result(True)

    async def caught_up(self, expected: int, timeout_s: float = CATCH_UP_S) -> None:
        """Returns once ``expected`` deltas were applied; raises DeltasLost if the stream
        broke first or they did not come within ``timeout_s``."""
        if self.received >= expected:
            return
        if self.broken:
            raise DeltasLost("the worker's delta stream broke")
        self.expected = expected
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            done = await asyncio.wait_for(self._waiter, timeout_s)
        except TimeoutError:
            done = False
        finally:
            self._waiter = None
        if not done:
            raise DeltasLost(f"{expected - self.received} of the run's deltas never arrived")

    def fail(self) -> None:
        """The stream broke: the run's Execute call is cancelled, and the run resumes
        from the deltas applied (``lost_in_transit``)."""
        self.broken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(False)
        if self.call is not None:
            self.call.cancel()


class DeltaStream:
    """The scheduler's end of one worker's StreamDeltas stream, for the worker's life."""

    def __init__(self, worker_id: str, stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
        self.worker_id = worker_id
        self.stub = stub
        self.stream_id = ""
        self.ready = False  # open: runs may name it
        self.supported = True  # False once the worker answered UNIMPLEMENTED
        self.sinks: dict[str, RunSink] = {}

    def attach(self, key: str, apply: Callable[[worker_pb2.TextDelta], None]) -> RunSink | None:
        """A sink for run ``key`` if the stream is open (the run names ``stream_id``)."""
        if not self.ready:
            return None
        sink = self.sinks[key] = RunSink(apply)
        return sink

    def detach(self, key: str, sink: RunSink) -> None:
        if self.sinks.get(key) is sink:
            del self.sinks[key]

    async def run(self) -> None:
        """Keeps the stream open while the worker is in the pool (cancelled when it goes)."""
        while self.supported:
            await self._once()
            if self.supported:
                await asyncio.sleep(RETRY_S)

    async def _once(self) -> None:
        self.stream_id = secrets.token_hex(12)
        call = self.stub.StreamDeltas(worker_pb2.StreamDeltasRequest(stream_id=self.stream_id))
        try:
            async for message in call:
                if not self.ready:
                    self.ready = True
                    log.info("worker %s: deltas on one stream", self.worker_id)
                sinks = self.sinks
                for item in message.deltas:
                    sink = sinks.get(item.job_id)
                    if sink is not None:
                        sink.deliver(item.delta)
            log.warning("worker %s: delta stream ended", self.worker_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
                log.info("worker %s predates StreamDeltas: deltas on Execute", self.worker_id)
            else:
                log.warning("worker %s: delta stream broke: %s", self.worker_id, exc.code().name)
        finally:
            self.ready = False
            sinks, self.sinks = self.sinks, {}
            for sink in sinks.values():
                sink.fail()
            call.cancel()
