"""Scenario ``heartbeat-stop``: a worker that stops heartbeating with streams on it.

SIGSTOP freezes the worker without closing a socket: its streams and its
heartbeats just stop, which no exit or connection error announces. The
scheduler must notice the missed heartbeats and resume that worker's jobs on
the other one with exactly the text still owed; the figure is the seconds
from the SIGSTOP until every stream ended. Then SIGCONT: the thawed worker
must not deliver anything more for jobs it lost, and must be in the pool
again (``seconds_to_recover``: from SIGCONT until the scheduler lists it alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import grpc

from bench.faults.live import Judged, internal_stats, judge, pid, running_stack
from shortline.client import AsyncGenerateStream, AsyncShortlineClient, ClientOptions
from shortline.stack import Stack

VICTIM = "worker-1"
STREAM_TIMEOUT_S = 90.0


async def _streams(address: str, n: int, tokens: int, victim: int) -> tuple[Judged, float]:
    """Judged streams, and the seconds from SIGSTOP until they all ended."""
    options = ClientOptions(target=address, timeout_seconds=STREAM_TIMEOUT_S)
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
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        _done, pending = await asyncio.wait(tasks, timeout=STREAM_TIMEOUT_S + 10)
        all_done = time.monotonic() - stopped_at
        for task in pending:
            task.cancel()
        for stream, task in zip(streams, tasks, strict=True):
            hung = task in pending
            error = None
            if not hung and task.exception() is not None:
                error = repr(task.exception())[:200]
            judge(judged, stream.text, tokens, error=error, hung=hung)
    return judged, all_done


def _listed_alive(stack: Stack) -> bool:
    with contextlib.suppress(grpc.RpcError):
        return any(w.worker_id == VICTIM and w.alive for w in internal_stats(stack).workers)
    return False


def _alive_again(stack: Stack, timeout: float) -> float | None:
    """Seconds until the scheduler lists the victim alive (None: not in ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _listed_alive(stack):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def heartbeat_stop(quick: bool) -> dict[str, Any]:
    """SIGSTOP a worker mid-stream, then SIGCONT (see the module docstring)."""
    n, tokens = (12, 300) if quick else (16, 600)
    with running_stack() as (stack, _lines):
        victim = pid(stack, VICTIM)
        try:
            judged, all_done = asyncio.run(_streams(stack.scheduler_address, n, tokens, victim))
        finally:
            dead_before = not _listed_alive(stack)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        recovered = _alive_again(stack, 60)
        restarts = stack.restarts(VICTIM)
        same = pid(stack, VICTIM) == victim
    problems = list(judged.errors[:3])
    if not dead_before:
        problems.append(f"the scheduler still listed {VICTIM} alive when it was thawed")
    if recovered is None:
        problems.append(f"{VICTIM} not alive in the pool 60 s after SIGCONT")
    return {
        "name": "heartbeat-stop",
        **judged.columns(),
        "seconds_to_recover": recovered,
        "seconds_stop_to_all_done": round(all_done, 2),
        "streams": n,
        "tokens": tokens,
        "victim_listed_dead_before_sigcont": dead_before,
        "victim_restarted": restarts,
        "victim_same_process": same,
        "figure": f"SIGSTOP to all {n} streams done {all_done:.1f} s",
        "problems": problems,
    }
