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

from bench.faults.live import internal_stats, pid, running_stack, signal_mid_streams
from shortline.stack import Stack

VICTIM = "worker-1"


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
            judged, all_done, _ = asyncio.run(
                signal_mid_streams(stack, n, tokens, victim, signal.SIGSTOP)
            )
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
