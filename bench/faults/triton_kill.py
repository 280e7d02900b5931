"""Scenario ``triton-kill``: kill -9 the embedded Triton under the workers, mid-stream.

Under ``shortline up`` one Triton serves every worker, so the kill takes out
all the capacity at once: no worker can take the requeued jobs, and the only
way to finish them is to wait for the launcher to restart Triton. The victim
is the ``tritonserver`` binary itself (not the ``shortline triton serve``
wrapper around it), as a crash of the server would be; the wrapper notices,
cleans up its shared memory and exits, and the launcher starts a new one.

What must hold, and is checked: every worker stays registered but stops being
offered work while its Triton is gone (the scheduler lists it not alive, and
its log shows no worker lost or joining again); the jobs that were running
are requeued with their text and resume from it once Triton serves again
(the replay text shows any gap, repeat or splice); no stream ends in an error
(retries spent while Triton was down would be one) or hangs.

``seconds_to_recover`` is from the kill to the first token any stream
received after Triton answered ready again: the recovery a client sees. The
row also has the kill to Triton ready, to every worker serving again in the
scheduler's view, and to every stream done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.faults.live import (
    STREAM_TIMEOUT_S,
    Judged,
    child,
    internal_stats,
    judge_tasks,
    pid,
    running_stack,
)
from shortline.stack import Stack, triton_ready

# How often the outage is looked at (Triton's readiness, the scheduler's pool).
POLL_S = 0.1
# Longest wait for the streams to have text before the kill, and for Triton to be back.
START_WAIT_S = 30.0
RECOVER_WAIT_S = 90.0


def _server_pid(wrapper: int) -> int:
    """The ``tritonserver`` process started by the ``shortline triton serve`` wrapper."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == wrapper and comm == "tritonserver":
                return int(entry.name)
    raise RuntimeError(f"no tritonserver process under the Triton wrapper {wrapper}")


def _remove_dead_shm(wrapper: int) -> int:
    """Shared-memory regions left by the dead wrapper's Triton (their names carry its
    pid); only when that pid is gone. Returns how many were removed."""
    if Path(f"/proc/{wrapper}").exists():
        return 0
    removed = 0
    for leftover in Path("/dev/shm").glob(f"shortline{wrapper}x*"):
        with contextlib.suppress(OSError):
            leftover.unlink()
            removed += 1
    return removed


@dataclass
class Outage:
    """What the watcher saw from the kill on (monotonic times)."""

    killed_at: float
    triton_ready_at: float | None = None
    workers_serving_at: float | None = None
    seen_not_serving: set[str] = field(default_factory=set)
    fewest_listed: int | None = None

    def since_kill(self, at: float | None) -> float | None:
        return None if at is None else round(at - self.killed_at, 2)


def _look(stack: Stack, outage: Outage) -> None:
    """One look at Triton and at the scheduler's pool."""
    now = time.monotonic()
    if outage.triton_ready_at is None and triton_ready(stack.cfg.host, stack.cfg.triton_grpc_port):
        outage.triton_ready_at = now
    with contextlib.suppress(grpc.RpcError):
        workers = internal_stats(stack, timeout=1.0).workers
        listed = len(workers)
        outage.fewest_listed = min(listed, outage.fewest_listed or listed)
        outage.seen_not_serving |= {w.worker_id for w in workers if not w.alive}
        all_back = listed == stack.cfg.workers and all(w.alive for w in workers)
        if outage.seen_not_serving and all_back and outage.workers_serving_at is None:
            outage.workers_serving_at = now


async def _watch(stack: Stack, outage: Outage, done: asyncio.Event) -> None:
    while not done.is_set():
        await asyncio.to_thread(_look, stack, outage)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), POLL_S)


async def _streams(
    stack: Stack, n: int, tokens: int, victim: int
) -> tuple[Judged, Outage, float | None, float]:
    """``n`` replay streams; once each has text, kill -9 ``victim``. Returns the judged
    streams, the outage, the first token after Triton was ready again, and when the
    last stream ended."""
    from shortline.client import AsyncGenerateStream, AsyncShortlineClient

    arrivals: list[float] = []  # when each piece of text reached a client

    async def follow(stream: AsyncGenerateStream) -> str:
        async for _piece in stream:
            arrivals.append(time.monotonic())
        return stream.text

    options = stack.client_options(timeout_seconds=STREAM_TIMEOUT_S)
    judged = Judged()
    async with AsyncShortlineClient(options) as client:
        streams = [
            client.generate(f"stream {i}", model="replay", max_tokens=tokens, ignore_eos=True)
            for i in range(n)
        ]
        tasks = [asyncio.create_task(follow(s)) for s in streams]
        deadline = time.monotonic() + START_WAIT_S
        while not all(s.text for s in streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        outage = Outage(killed_at=time.monotonic())
        done = asyncio.Event()
        watcher = asyncio.create_task(_watch(stack, outage, done))
        _, pending = await asyncio.wait(tasks, timeout=STREAM_TIMEOUT_S + 10)
        ended = time.monotonic()
        done.set()
        await watcher
        for task in pending:
            task.cancel()
        judge_tasks(judged, streams, tasks, pending, tokens)
    ready = outage.triton_ready_at
    after = [t for t in arrivals if ready is not None and t >= ready]
    return judged, outage, min(after) if after else None, ended


def _scheduler_log_count(stack: Stack, needle: str) -> int:
    path = child(stack, "scheduler").log_path
    if path is None or not path.exists():
        return 0
    return path.read_text(errors="replace").count(needle)


def triton_kill(quick: bool) -> dict[str, Any]:
    """kill -9 the embedded Triton mid-stream (see the module docstring)."""
    n, tokens = (12, 300) if quick else (16, 600)
    with running_stack() as (stack, lines):
        wrapper = pid(stack, "triton")
        victim = _server_pid(wrapper)
        judged, outage, first_token, ended = asyncio.run(_streams(stack, n, tokens, victim))
        # The streams can all end before Triton is ready if something is wrong: wait for it.
        back = lines.wait_for("triton is SERVING again", RECOVER_WAIT_S)
        restarts = stack.restarts("triton")
        lost_lines = _scheduler_log_count(stack, " lost: ")
        joins = _scheduler_log_count(stack, " joined: ")
    removed = _remove_dead_shm(wrapper)
    problems = list(judged.errors[:3])
    workers = {f"worker-{i + 1}" for i in range(stack.cfg.workers)}
    if back is None:
        problems.append(f"Triton not SERVING again within {RECOVER_WAIT_S:.0f} s")
    if restarts != 1:
        problems.append(f"Triton restarted {restarts} times, not once")
    if outage.seen_not_serving != workers:
        missing = ", ".join(sorted(workers - outage.seen_not_serving)) or "none"
        problems.append(f"never listed not serving during the outage: {missing}")
    if outage.fewest_listed != len(workers):
        problems.append(f"the pool shrank to {outage.fewest_listed} workers during the outage")
    if lost_lines or joins != len(workers):
        problems.append(
            f"workers dropped ({lost_lines} lost) or joined again ({joins} joins, "
            f"{len(workers)} expected) instead of pausing"
        )
    if outage.workers_serving_at is None:
        problems.append("the scheduler did not list every worker serving again")
    if first_token is None:
        problems.append("no token reached a client after Triton was ready again")
    recovered = outage.since_kill(first_token)
    return {
        "name": "triton-kill",
        **judged.columns(),
        "seconds_to_recover": recovered,
        "seconds_kill_to_triton_ready": outage.since_kill(outage.triton_ready_at),
        "seconds_kill_to_workers_serving": outage.since_kill(outage.workers_serving_at),
        "seconds_kill_to_first_token": recovered,
        "seconds_kill_to_all_done": outage.since_kill(ended),
        "streams": n,
        "tokens": tokens,
        "triton_restarts": restarts,
        "shm_leftovers_removed": removed,
        "figure": f"kill to Triton ready {_s(outage.since_kill(outage.triton_ready_at))}, "
        f"workers serving {_s(outage.since_kill(outage.workers_serving_at))}, "
        f"first token {_s(recovered)}, all {n} streams done "
        f"{_s(outage.since_kill(ended))}",
        "problems": problems,
    }


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"
