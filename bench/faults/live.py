"""What the scenarios against a real ``shortline up`` share: the stack, the judge, the stats.

The stack is :class:`shortline.stack.Stack` (the launcher itself, supervising)
on a free block of ports with Triton serving only ``replay``, so every
stream's text is known in advance: ``" replay1 replay2 ... replayN"``. The
judge reads a delivered text back into its numbers, so a lost stretch (gap),
a stretch delivered twice (repeat) or text from another stream (splice) each
shows by itself rather than as one "wrong text".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2
from shortline.stack import Child, Stack, StackConfig
from shortline.stack_plan import free_config

_WORD = re.compile(r" replay(\d+)")


def replay_text(n: int) -> str:
    return "".join(f" replay{i}" for i in range(1, n + 1))


def stack_config(tmp: Path, **overrides: Any) -> StackConfig:
    """A config on free ports: two workers of 8 slots, Triton serving only ``replay``."""
    fields: dict[str, Any] = dict(
        log_dir=str(tmp / "logs"),
        workers=2,
        slots=8,
        triton_models="replay",
        replay_step_a_ms=10.0,
        replay_step_b_ms=1.0,
    )
    fields.update(overrides)
    return free_config(**fields)


class Lines(list[str]):
    """The supervisor's lines for the operator, waited on by the scenarios."""

    def wait_for(self, needle: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self if needle in line]
            if found:
                return found[0]
            time.sleep(0.05)
        return None


@contextlib.contextmanager
def running_stack(*, tls: bool = False, **overrides: Any) -> Iterator[tuple[Stack, Lines]]:
    """``shortline up`` (supervising) in a scratch folder, stopped on exit. With ``tls``
    as deployed: TLS on every listener, mutual TLS between the services, and a bearer
    token for clients (``stack.client_options()`` carries the CA and the token)."""
    with tempfile.TemporaryDirectory(prefix="shortline-faults-") as tmp:
        if tls:
            overrides.update(tls=True, certs_dir=f"{tmp}/certs", tokens_file=f"{tmp}/tokens.toml")
        lines = Lines()
        stack = Stack(stack_config(Path(tmp), **overrides), say=lines.append)
        with stack:
            yield stack, lines


def child(stack: Stack, name: str) -> Child:
    return next(c for c in stack.children if c.name == name)


def pid(stack: Stack, name: str) -> int:
    proc = child(stack, name).process
    assert proc is not None, f"{name} has no process"
    return proc.pid


def internal_stats(stack: Stack, timeout: float = 2.0) -> scheduler_pb2.GetStatsResponse:
    """The scheduler's view of its pool, from its internal port (slots per worker)."""
    address = f"{stack.cfg.host}:{stack.cfg.scheduler_internal_port}"
    with grpc.insecure_channel(address) as channel:
        stub = internal_pb2_grpc.SchedulerInternalServiceStub(channel)
        response: scheduler_pb2.GetStatsResponse = stub.GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=timeout
        )
        return response


@dataclass
class Judged:
    """The common columns over a set of streams."""

    accepted: int = 0
    completed: int = 0
    lost: int = 0
    hung: int = 0
    gaps: int = 0
    repeats: int = 0
    spliced: int = 0
    errors: list[str] = field(default_factory=list)

    def columns(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "completed": self.completed,
            "lost": self.lost,
            "hung": self.hung,
            "gaps": self.gaps,
            "repeats": self.repeats,
            "spliced": self.spliced,
        }


def judge_text(judged: Judged, text: str, n: int) -> bool:
    """Counts the gaps, repeats and splices of one stream's text; True when it is exact."""
    numbers = [int(m) for m in _WORD.findall(text)]
    if _WORD.sub("", text):
        judged.spliced += 1
    seen: set[int] = set()
    expected = 1
    for k in numbers:
        if k in seen or k < expected:
            judged.repeats += 1
        elif k > expected:
            judged.gaps += 1
        seen.add(k)
        expected = max(expected, k + 1)
    return text == replay_text(n)


def judge(judged: Judged, text: str, n: int, *, error: str | None, hung: bool) -> None:
    """One stream: accepted once it delivered anything or ended; then completed
    (exact text, no error), hung (did not end in time) or lost."""
    if text or error is None:
        judged.accepted += 1
    exact = judge_text(judged, text, n)
    if hung:
        judged.hung += 1
    elif error is None and exact:
        judged.completed += 1
    else:
        judged.lost += 1
        if error is not None:
            judged.errors.append(error)


def task_error(task: asyncio.Task[Any], pending: set[asyncio.Task[Any]]) -> str | None:
    """How a stream's task ended: None when it finished (or is still pending)."""
    if task in pending or task.exception() is None:
        return None
    return repr(task.exception())[:200]


def judge_tasks(
    judged: Judged,
    streams: Sequence[Any],
    tasks: Sequence[asyncio.Task[Any]],
    pending: set[asyncio.Task[Any]],
    tokens: int,
) -> None:
    """Judges replay streams of ``tokens`` tokens by their texts and how their tasks ended."""
    for stream, task in zip(streams, tasks, strict=True):
        error = task_error(task, pending)
        judge(judged, stream.text, tokens, error=error, hung=task in pending)


STREAM_TIMEOUT_S = 90.0


async def signal_mid_streams(
    stack: Stack, n: int, tokens: int, victim: int, sig: signal.Signals
) -> tuple[Judged, float, set[str]]:
    """``n`` replay streams; once each has text, ``sig`` to process ``victim``.

    Returns the judged streams, the seconds from the signal until they all
    ended, and the workers that produced their last tokens."""
    from shortline.client import AsyncGenerateStream, AsyncShortlineClient

    options = stack.client_options(timeout_seconds=STREAM_TIMEOUT_S)
    judged = Judged()
    async with AsyncShortlineClient(options) as client:
        streams: list[AsyncGenerateStream] = [
            client.generate(f"stream {i}", model="replay", max_tokens=tokens, ignore_eos=True)
            for i in range(n)
        ]
        tasks = [asyncio.create_task(s.collect()) for s in streams]
        deadline = time.monotonic() + 30
        while not all(s.text for s in streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        os.kill(victim, sig)
        signalled_at = time.monotonic()
        _done, pending = await asyncio.wait(tasks, timeout=STREAM_TIMEOUT_S + 10)
        all_done = time.monotonic() - signalled_at
        for task in pending:
            task.cancel()
        judge_tasks(judged, streams, tasks, pending, tokens)
    workers = {s.result.worker_id for s in streams if s.result is not None}
    return judged, all_done, workers
