"""Scenario ``predictor-restart``: kill -9 the predictor under a steady stream of requests.

A request arrives every ``gap`` seconds before the kill, through the outage
and after the launcher has the predictor serving again. The predictor must
never hold a request up: while it is gone each request is still admitted, at
once, with the scheduler's fallback prediction (``Accepted.prediction_source``
FALLBACK), and runs to its exact replay text; once it is back, predictions
come from it again without anyone restarting the scheduler (its channel's
reconnect backoff is bounded).

Which head: the predictor has no head for ``replay`` (a Triton model with
exact lengths, not a length model), and admission refuses a ``length_model``
without one. Each request names the scheduler's default length model, which
the predictor serves (checked with its ``ListModels`` first): a real head
then predicts every replay request, so a PREDICTOR source means the predictor
answered. A semantic-cache hit (CACHE) needs the predictor's embedding, so it
counts as the predictor answering too; prompts differ enough that hits are rare.

``seconds_to_recover``: from the kill to the first request (by its send time;
its prediction is made at admission, within the scheduler's predictor
timeout) predicted by the predictor again. The figure also has the fallbacks
during the outage and the kill to the predictor SERVING again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc

from bench.faults.live import (
    STREAM_TIMEOUT_S,
    Judged,
    child,
    internal_stats,
    judge,
    pid,
    running_stack,
)
from services.scheduler.config import SchedulerConfig
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from shortline.stack import Stack

VICTIM = "predictor"
# Sources meaning the predictor answered (a cache hit is looked up by its embedding).
FROM_PREDICTOR = ("predictor", "cache")
# Of the requests sent last, at least one must be predicted by the predictor: it came
# back for good, not for one answer (one slow answer, a fallback, is no failure).
LAST_N = 3
RECOVER_WAIT_S = 90.0
POLL_S = 0.1

_SUBJECTS = (
    "volcanoes", "tax law", "sourdough bread", "the Roman senate", "jazz harmony",
    "orbital mechanics", "knitting socks", "Byzantine icons", "garbage collection",
    "coral reefs", "chess openings", "medieval castles", "solar panels", "haiku",
    "tidal energy", "the stock market", "beekeeping", "glacier retreat",
)  # fmt: skip
_TASKS = (
    "Write a limerick about",
    "List three surprising facts on",
    "Explain to a ten-year-old how",
    "Draft a formal complaint letter concerning",
    "Compare the pros and cons of",
    "Give a step-by-step recipe involving",
    "Summarise the history of",
)


_FOR = (
    "a sailor", "my grandmother", "a physics class", "a startup pitch", "a wedding toast",
    "a bedtime story", "a museum guide", "a job interview", "a radio ad", "a court hearing",
    "a travel blog",
)  # fmt: skip


def prompt(i: int) -> str:
    """A different request each time (no two alike in the first 1,386), so the semantic
    cache rarely answers for the predictor."""
    # 7, 18 and 11 phrases, pairwise coprime: the triple repeats only after 7 * 18 * 11.
    task, subject = _TASKS[i % len(_TASKS)], _SUBJECTS[i % len(_SUBJECTS)]
    audience = _FOR[i % len(_FOR)]
    return f"{task} {subject}, for {audience} (#{i})"


def length_model(stack: Stack) -> tuple[str, list[str]]:
    """The scheduler's default length model and the targets the predictor has heads for."""
    default = SchedulerConfig().default_length_model
    address = f"{stack.cfg.host}:{stack.cfg.predictor_port}"
    with grpc.insecure_channel(address) as channel:
        reply = predictor_pb2_grpc.PredictorServiceStub(channel).ListModels(
            predictor_pb2.ListModelsRequest(), timeout=10.0
        )
    return default, sorted(m.target_model for m in reply.models)


@dataclass
class Sent:
    at: float
    source: str = ""


async def _requests(
    stack: Stack, target: str, tokens: int, gap: float, before_s: float, after_s: float
) -> tuple[Judged, list[Sent], float, float | None]:
    """Requests every ``gap`` s: ``before_s`` before the kill, then until ``after_s``
    after the predictor serves again. Returns the judged streams, each request's send
    time and prediction source, the kill and when the predictor served again."""
    from shortline.client import AsyncGenerateStream, AsyncShortlineClient

    victim = pid(stack, VICTIM)
    predictor = child(stack, VICTIM)
    options = stack.client_options(timeout_seconds=STREAM_TIMEOUT_S)
    judged = Judged()
    sent: list[Sent] = []
    streams: list[AsyncGenerateStream] = []
    tasks: list[asyncio.Task[str]] = []
    killed_at: float | None = None
    back_at: float | None = None
    checking: asyncio.Task[bool] | None = None
    async with AsyncShortlineClient(options) as client:
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if killed_at is None and now - started >= before_s:
                os.kill(victim, signal.SIGKILL)
                killed_at = now = time.monotonic()
            if killed_at is not None and back_at is None:
                if checking is not None and checking.done():
                    if checking.result():
                        back_at = now
                    checking = None
                if checking is None and back_at is None:
                    checking = asyncio.create_task(asyncio.to_thread(stack.healthy, predictor))
            if back_at is not None and now - back_at >= after_s:
                break
            if killed_at is not None and back_at is None and now - killed_at > RECOVER_WAIT_S:
                break
            i = len(streams)
            stream = client.generate(
                prompt(i), model="replay", max_tokens=tokens, ignore_eos=True, length_model=target
            )
            streams.append(stream)
            sent.append(Sent(at=time.monotonic()))
            tasks.append(asyncio.create_task(stream.collect()))
            await asyncio.sleep(gap)
        if checking is not None:
            with contextlib.suppress(Exception):
                await checking
        _, pending = await asyncio.wait(tasks, timeout=STREAM_TIMEOUT_S + 10)
        for task in pending:
            task.cancel()
        for stream, task, record in zip(streams, tasks, sent, strict=True):
            hung = task in pending
            error = None
            if not hung and task.exception() is not None:
                error = repr(task.exception())[:200]
            judge(judged, stream.text, tokens, error=error, hung=hung)
            if stream.accepted is not None:
                record.source = stream.accepted.prediction_source
    assert killed_at is not None
    return judged, sent, killed_at, back_at


def predictor_restart(quick: bool) -> dict[str, Any]:
    """kill -9 the predictor under a request stream (see the module docstring)."""
    tokens, gap, before_s, after_s = (40, 0.25, 2.0, 4.0) if quick else (100, 0.1, 5.0, 10.0)
    with running_stack() as (stack, _lines):
        target, heads = length_model(stack)
        judged, sent, killed_at, back_at = asyncio.run(
            _requests(stack, target, tokens, gap, before_s, after_s)
        )
        restarts = stack.restarts(VICTIM)
        counted: int | None = None
        with contextlib.suppress(grpc.RpcError):
            counted = internal_stats(stack).predictor_fallbacks
    end = back_at if back_at is not None else float("inf")
    before = [s for s in sent if s.at < killed_at]
    outage = [s for s in sent if killed_at <= s.at < end]
    after = [s for s in sent if s.at >= end]
    fallbacks = sum(s.source == "fallback" for s in outage)
    predicted_again = [
        s.at - killed_at for s in sent if s.at >= killed_at and s.source in FROM_PREDICTOR
    ]
    recovered = round(min(predicted_again), 2) if predicted_again else None
    back = None if back_at is None else round(back_at - killed_at, 2)
    last = [s.source or "none" for s in sent[-LAST_N:]]

    def sources(group: list[Sent]) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in group:
            out[s.source or "none"] = out.get(s.source or "none", 0) + 1
        return out

    problems = list(judged.errors[:3])
    if target not in heads:
        problems.append(f"the predictor has no head for {target!r} (it has {', '.join(heads)})")
    if restarts != 1:
        problems.append(f"{VICTIM} restarted {restarts} times, not once")
    if back_at is None:
        problems.append(f"{VICTIM} not SERVING again within {RECOVER_WAIT_S:.0f} s")
    if not outage or fallbacks == 0:
        problems.append(f"no fallback prediction during the outage ({len(outage)} requests)")
    if recovered is None:
        problems.append("no request predicted by the predictor after the restart")
    if not any(s in FROM_PREDICTOR for s in last):
        problems.append(f"none of the last {LAST_N} requests was predicted: {', '.join(last)}")
    return {
        "name": "predictor-restart",
        **judged.columns(),
        "seconds_to_recover": recovered,
        "seconds_kill_to_serving": back,
        "requests": len(sent),
        "tokens": tokens,
        "length_model": target,
        "sources_before": sources(before),
        "sources_outage": sources(outage),
        "sources_after": sources(after),
        "fallbacks_during_outage": fallbacks,
        "scheduler_predictor_fallbacks": counted,
        "predictor_restarts": restarts,
        "figure": f"{fallbacks} of {len(outage)} requests during the outage fell back; "
        f"predictor SERVING {_s(back)} after the kill, predicting again {_s(recovered)}",
        "problems": problems,
    }


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"
