"""Scenario ``worker-kill``: kill -9 a worker with streams on it, under ``shortline up``.

Two workers of 8 slots; 12 (``--quick``) or 16 long replay streams spread
over both, every one started before the kill, so some are on the killed
worker mid-stream. The scheduler must resume those on the other worker with
exactly the text still owed (the replay text shows a gap or repeat), and the
launcher must have the killed worker serving again: its seconds from the kill
to "worker-1 is SERVING again" are ``seconds_to_recover``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from bench.faults.live import pid, running_stack, signal_mid_streams

VICTIM = "worker-1"


def worker_kill(quick: bool, tls: bool = False) -> dict[str, Any]:
    """kill -9 a worker mid-stream (see the module docstring); ``tls``: TLS, mutual TLS
    and a token, as deployed."""
    n, tokens = (12, 300) if quick else (16, 600)
    with running_stack(tls=tls) as (stack, lines):
        victim = pid(stack, VICTIM)
        killed_at = time.monotonic()
        judged, _, workers = asyncio.run(
            signal_mid_streams(stack, n, tokens, victim, signal.SIGKILL)
        )
        serving = lines.wait_for(f"{VICTIM} is SERVING again", 90)
        recovered = time.monotonic() - killed_at if serving else None
        # The kill happened once the streams had started: measure from the supervisor's line.
        if serving and "s after it stopped" in serving:
            recovered = float(serving.rsplit("(", 1)[1].split(" s after")[0])
        restarts = stack.restarts(VICTIM)
    problems = list(judged.errors[:3])
    if serving is None:
        problems.append(f"{VICTIM} not SERVING again within 90 s")
    if restarts != 1:
        problems.append(f"{VICTIM} restarted {restarts} times, not once")
    return {
        "name": "worker-kill",
        "tls": tls,
        **judged.columns(),
        "seconds_to_recover": recovered,
        "streams": n,
        "tokens": tokens,
        "finished_on": sorted(workers),
        "figure": f"{n} streams x {tokens} tokens, {VICTIM} killed, finished on "
        f"{'+'.join(sorted(workers)) or 'none'}",
        "problems": problems,
    }
