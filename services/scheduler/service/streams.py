"""A request's record on the service side and the client streams that follow it.

A request's text is accumulated here as the worker streams it, so a job
resumed on another worker (after a preemption or a lost worker) continues from
exactly what the client already has (``resume_text``/``resume_tokens``), and
the client sees one stream. A retried ``request_id`` attaches to the same
record: :func:`follow` replays the text so far, then the live deltas, with no
await between the snapshot and the live part.

When the last stream of an unfinished request goes away, the request is
cancelled at once (its worker slot free within milliseconds), or after its
``reattach_grace_s`` when the client asked to be reattachable
(``GenerateRequest.reattach_grace_seconds``) and no stream came back by then.
A stream is over when its RPC is (:class:`Subscription`, ended from the RPC's
done callback), not when the garbage collector finalizes its generator: gRPC
stops iterating the handler of a cancelled RPC without closing it, so a
``finally`` in the generator may run seconds later, or never.

The record hangs off the core's job (``job.attachment``) while the job is live:
the core's table of jobs is the one registry of requests; finished records are
kept by ``results.ResultStore`` for retried ids.

What the streams get is published, not written straight to them: a change
(text, the end) calls ``on_change``, the admission journal's hook, which
commits the change and then calls :meth:`Request.publish`; without a journal
the change is published at once. Streams read only the published part
(``text[:shown]``, ``final_shown``), so none ever holds text a restarted
scheduler would not have (``journal``).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace

from services.scheduler.core.job import Job
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

# What a stream ends with: a GenerateResponse carrying the result, or a
# (grpc.StatusCode, message) pair the servicer aborts with.
Final = Any


class Subscriber(Protocol):
    """Where a stream is published to (``Inbox``; an ``asyncio.Queue`` also fits)."""

    def put_nowait(self, item: Any, /) -> None: ...


@dataclass(eq=False)
class Request:
    """The service's side of a job: the streamed text and the client streams.

    ``id`` is the client's request id, what every message to the client says;
    ``job.id`` is the core's key for it, scoped to the tenant
    (``tenancy.scoped_key``)."""

    id: str
    job: Job
    sampling: common_pb2.SamplingParams
    tenant: str = ""
    # What the request was made of, field by field (``tenancy.fingerprint``): a
    # reused id must be the same request. Digests only: the prompt is the job's.
    fingerprint: tuple[bytes, ...] = ()
    # The current run's job id on its worker: random, so workers learn no request id.
    run_key: str = ""
    # Generated so far (a resumed run continues from it) and, of it, what the streams
    # were sent: ``text[:shown]``, ``shown_tokens`` tokens.
    text: str = ""
    tokens: int = 0
    shown: int = 0
    shown_tokens: int = 0
    subscribers: set[Subscriber] = field(default_factory=set)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: scheduler_pb2.Accepted | None = None
    final: Final = None  # GenerateResponse (result) or (StatusCode, message)
    final_shown: bool = False  # ``final`` was sent to the streams
    # The end is the scheduler stopping, not the request's: nothing to journal.
    interrupted: bool = False
    # Called on every change; None publishes at once (no journal).
    on_change: Callable[[Request], None] | None = None
    journal_mark: Any = None  # what the journal holds of it (``journal.Mark``)
    finished_at: float | None = None
    worker_id: str = ""
    # The prompt's tokens as the model counted them, from a run that resumed nothing
    # (a resumed run's input also holds the text generated before); 0: not reported.
    prompt_tokens: int = 0
    # The predictor head that predicted it ("" for other sources, or a restored request).
    head_version: str = ""
    # How long the request outlives its last stream (0: cancelled at once), capped by
    # the scheduler's max_reattach_grace_s.
    reattach_grace_s: float = 0.0
    disconnect_timer: asyncio.Handle | None = None  # the pending cancel, if any
    trace_context: contextvars.Context | None = None
    # Open from the moment the job is queued with its prediction until its
    # first dispatch, so a trace shows the time spent waiting.
    queue_span: trace.Span | None = None

    def end_queue_span(self, **attributes: Any) -> None:
        if self.queue_span is None:
            return
        self.queue_span.set_attributes({f"shortline.{k}": v for k, v in attributes.items()})
        self.queue_span.end()
        self.queue_span = None

    def broadcast(self, item: Any) -> None:
        for q in self.subscribers:
            q.put_nowait(item)

    def add_text(self, text: str, tokens: int) -> None:
        """A delta from the worker: kept for resumes and late streams, published to the
        live ones."""
        self.text += text
        self.tokens += tokens
        self.changed()

    def changed(self) -> None:
        """Something the streams will see changed (accepted, text, the end)."""
        if self.on_change is None:
            self.publish()
        else:
            self.on_change(self)

    def publish(self) -> None:
        """Sends the streams what they have not had yet: the text since the last
        publish as one delta, then the end; releases streams waiting for Accepted."""
        if not self.final_shown and len(self.text) > self.shown:
            # Built in place: a TextDelta passed to the constructor would be copied.
            message = scheduler_pb2.GenerateResponse()
            delta = message.delta
            delta.text = self.text[self.shown :]
            delta.tokens = self.tokens - self.shown_tokens
            self.shown, self.shown_tokens = len(self.text), self.tokens
            self.broadcast(message)
        if self.final is not None and not self.final_shown:
            self.final_shown = True
            self.broadcast(self.final)
        if self.accepted is not None or self.final_shown:
            self.ready.set()

    def cancel_disconnect_timer(self) -> None:
        if self.disconnect_timer is not None:
            self.disconnect_timer.cancel()
            self.disconnect_timer = None


class Inbox:
    """What one stream has been published and not yet sent: ``asyncio.Queue``'s
    ``put_nowait`` (what :meth:`Request.broadcast` calls) without its bookkeeping
    (task counts, an event, waiters on both sides), and every waiting item handed over
    at one wake-up. A stream has one reader, so one waiter suffices; published items
    are never dropped (a stream is bounded by its request's text and end)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._items.clear()

    async def take(self) -> list[Any]:
        """Every item published since the last call (at least one, waiting for it)."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class Subscription:
    """One client stream's place among a request's subscribers.

    Ended once, by whichever comes first: :func:`follow` finishing (the result
    sent, an abort) or the RPC ending (``context.add_done_callback``: the client
    cancelled, closed its channel, or its process or connection died). The second
    is what frees a gone client's slot promptly: gRPC cancels the RPC's task, but a
    handler generator suspended in a send is dropped, not closed."""

    __slots__ = ("_on_disconnect", "queue", "req")

    def __init__(self, req: Request, on_disconnect: Callable[[Request], None]) -> None:
        self.req = req
        self._on_disconnect = on_disconnect
        self.queue = Inbox()
        req.cancel_disconnect_timer()
        req.subscribers.add(self.queue)

    def end(self, *_: Any) -> None:
        """Leaves the request; the last stream of an unfinished one leaving starts its
        reattach grace, or cancels it (on the next loop turn: a stream attaching in
        between keeps it). Idempotent; ``*_`` takes the RPC context of a done callback."""
        req = self.req
        if self.queue not in req.subscribers:
            return
        req.subscribers.discard(self.queue)
        if req.subscribers or req.final is not None:
            return
        await_reattach(req, req.reattach_grace_s, self._on_disconnect)


def await_reattach(req: Request, grace_s: float, on_disconnect: Callable[[Request], None]) -> None:
    """Cancels ``req`` (``on_disconnect``) unless a stream attaches within ``grace_s``
    (0: on the next loop turn, so a stream attaching in between keeps it)."""
    loop = asyncio.get_running_loop()
    if grace_s > 0.0:
        req.disconnect_timer = loop.call_later(grace_s, _disconnected, req, on_disconnect)
    else:
        req.disconnect_timer = loop.call_soon(_disconnected, req, on_disconnect)


async def follow(sub: Subscription) -> AsyncIterator[Any]:
    """One client stream: Accepted, the text so far, live deltas, the result."""
    req, queue = sub.req, sub.queue
    try:
        if not req.ready.is_set():
            await req.ready.wait()
        if isinstance(req.final, tuple) and req.final_shown and req.accepted is None:
            yield req.final
            return
        # The published part only, and no await between this snapshot and the live
        # items that follow it (published later, so queued after it).
        text, tokens, ended = req.text[: req.shown], req.shown_tokens, req.final_shown
        queue.clear()
        if req.accepted is not None:
            yield scheduler_pb2.GenerateResponse(accepted=req.accepted)
        if text:
            yield scheduler_pb2.GenerateResponse(
                delta=scheduler_pb2.TextDelta(text=text, tokens=tokens)
            )
        if ended:
            yield req.final
            return
        while True:
            for item in await queue.take():
                yield item
                # The end is published once, as ``req.final`` itself.
                if item is req.final:
                    return
    finally:
        sub.end()


def _disconnected(req: Request, on_disconnect: Callable[[Request], None]) -> None:
    req.disconnect_timer = None
    if req.subscribers or req.final is not None:
        return
    on_disconnect(req)
