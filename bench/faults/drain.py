"""Scenario ``drain``: SIGTERM drain of one worker, then of the whole stack, under load.

One supervised ``shortline up`` (two workers of 8 slots, Triton serving only
``replay`` so every text is known) with a short ``drain_grace_s``, so that one
SIGTERM shows both ways a draining worker's job can end.

(a) ``worker_drain``: replay streams of two lengths run on both workers; then
SIGTERM (``os.kill``, not the launcher) to worker-1. It must say NOT_SERVING at
once and take no new job (streams started after that must not run there); its
short jobs finish there within the grace, its long ones are handed back when
the grace ends and resume on the other worker from the text already sent.
Every stream, old and new, must end with its exact text. Figures: seconds from
SIGTERM to NOT_SERVING and to the process's exit, and how many of its jobs
finished there or moved (the worker's own ``draining:``/``drained:`` log
lines). The launcher did not send that SIGTERM, so it treats the exit like any
other (``shortline/stack.py: Stack._look_after`` -> ``_schedule_restart``): one
line "worker-1 exited with code 0; restarting it in 0.5 s", its process group
killed, and the worker started again after the backoff; the scenario records
that line and the seconds until worker-1 is SERVING again
(``seconds_to_recover``).

(b) ``stack_drain``: with both workers serving again, replay streams short
enough to end inside the grace are started, then ``Stack.stop()`` (the
launcher's own SIGTERM path: the scheduler drains first, then the workers, the
predictor and Triton). Every admitted stream must end with its exact text;
requests sent while the scheduler drains must be refused ``UNAVAILABLE``
(counted, not lost: the SDK retries those elsewhere); no process may need the
launcher's kill. Figure: seconds from ``stop()`` until every process exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc

from bench.faults.live import (
    STREAM_TIMEOUT_S,
    Judged,
    Lines,
    child,
    internal_stats,
    judge,
    running_stack,
)
from shortline.client import AsyncGenerateStream, AsyncShortlineClient
from shortline.stack import Child, Stack

VICTIM = "worker-1"
POLL_S = 0.02
START_TIMEOUT_S = 30.0
# What "at once" means for NOT_SERVING after SIGTERM (a signal handler and a health update).
NOT_SERVING_WITHIN_S = 1.0
# Beyond the grace, what a drained process may take to exit (hand-off, server stop).
EXIT_MARGIN_S = 8.0
RECOVER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Size:
    grace_s: float  # the stack's drain_grace_s (scheduler and workers)
    worker_streams: int  # (a): half short, half long
    short_tokens: int  # (a): ends well inside the grace
    long_tokens: int  # (a): outlives the grace, so it is handed off
    new_streams: int  # (a): started once the victim is NOT_SERVING
    stack_streams: int  # (b)
    stack_tokens: int  # (b): ends well inside the grace


# Replay steps 10 ms + 1 ms per sequence in Triton's batch: 100 tokens of 8-12
# sequences take ~2 s, 600 tokens ~8 s.
QUICK = Size(5.0, 8, 100, 600, 4, 10, 100)
FULL = Size(8.0, 12, 150, 1200, 6, 16, 200)


def _sum(*parts: Judged) -> Judged:
    total = Judged()
    for p in parts:
        for name in ("accepted", "completed", "lost", "hung", "gaps", "repeats", "spliced"):
            setattr(total, name, getattr(total, name) + getattr(p, name))
        total.errors += p.errors
    return total


class Streams:
    """Replay streams of known lengths on one client, each task's end time noted."""

    def __init__(self, client: AsyncShortlineClient) -> None:
        self.client = client
        self.streams: list[AsyncGenerateStream] = []
        self.tokens: list[int] = []
        self.tasks: list[asyncio.Task[str]] = []
        self.ended_at: dict[int, float] = {}

    def start(self, prefix: str, lengths: list[int]) -> None:
        for n in lengths:
            i = len(self.streams)
            stream = self.client.generate(
                f"{prefix} {i}", model="replay", max_tokens=n, ignore_eos=True
            )
            task = asyncio.create_task(stream.collect())
            task.add_done_callback(functools.partial(self._ended, i))
            self.streams.append(stream)
            self.tokens.append(n)
            self.tasks.append(task)

    def _ended(self, i: int, _task: asyncio.Task[str]) -> None:
        self.ended_at.setdefault(i, time.monotonic())

    async def until_text(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(s.text for s in self.streams) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        return all(s.text for s in self.streams)

    async def finish(self, timeout: float) -> Judged:
        """Waits up to ``timeout`` for every stream; a stream still open then is hung."""
        judged = Judged()
        _done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for stream, task, n in zip(self.streams, self.tasks, self.tokens, strict=True):
            hung = task in pending
            error = None
            if not hung and task.exception() is not None:
                error = repr(task.exception())[:200]
            judge(judged, stream.text, n, error=error, hung=hung)
        return judged

    def worker_of(self, i: int) -> str | None:
        result = self.streams[i].result
        return result.worker_id if result is not None else None


class Exits:
    """When each process exited, watched from SIGTERM on. Keeps the Popen objects:
    a restart replaces ``child.process``, and the question is about these ones."""

    def __init__(self, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        self.procs = procs
        self.at: dict[str, float] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="drain-exits", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._halt.is_set() and len(self.at) < len(self.procs):
            for name, proc in self.procs.items():
                if name not in self.at and proc.poll() is not None:
                    self.at[name] = time.monotonic()
            time.sleep(POLL_S)

    def wait(self, name: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while name not in self.at and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return self.at.get(name)

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=2)


def _until_not_serving(stack: Stack, target: Child, proc: subprocess.Popen[bytes]) -> float | None:
    """When ``target``'s health check first failed while its process still ran
    (None: it never said NOT_SERVING before it exited, or not within the bound)."""
    deadline = time.monotonic() + NOT_SERVING_WITHIN_S * 5
    while time.monotonic() < deadline and proc.poll() is None:
        if not stack.healthy(target):
            return time.monotonic() if proc.poll() is None else None
        time.sleep(POLL_S)
    return None


def _all_in_pool(stack: Stack, timeout: float) -> bool:
    """Every worker registered and alive in the scheduler's pool: SERVING on its own
    health check comes a little before a worker's registration, and a stream placed
    before that would all go to the other worker."""
    names = {c.name for c in stack.children if c.name.startswith("worker-")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            alive = {w.worker_id for w in internal_stats(stack).workers if w.alive}
            if names <= alive:
                return True
        time.sleep(0.1)
    return False


def _slots_used(stack: Stack, worker_id: str) -> int:
    return sum(w.slots_used for w in internal_stats(stack).workers if w.worker_id == worker_id)


def _first_log(target: Child) -> str:
    """The child's log before the launcher's first restart of it."""
    assert target.log_path is not None
    text = target.log_path.read_text(errors="replace")
    return text.split("---- restarted by shortline up", 1)[0]


def _wait_line(lines: Lines, words: tuple[str, ...], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if all(w in line for w in words):
                return line
        time.sleep(POLL_S)
    return None


def _since(t0: float, t: float | None) -> float | None:
    return None if t is None else round(t - t0, 2)


async def _worker_drain(stack: Stack, lines: Lines, size: Size) -> tuple[Judged, dict[str, Any]]:
    """Part (a): SIGTERM one worker mid-stream (see the module docstring)."""
    target = child(stack, VICTIM)
    proc = target.process
    assert proc is not None
    problems: list[str] = []
    options = stack.client_options(timeout_seconds=STREAM_TIMEOUT_S)
    if not await asyncio.to_thread(_all_in_pool, stack, START_TIMEOUT_S):
        problems.append(f"not every worker in the scheduler's pool within {START_TIMEOUT_S:g} s")
    async with AsyncShortlineClient(options) as client:
        old = Streams(client)
        # Short, short, long, long, ...: least-loaded placement alternates workers, so
        # each worker gets both lengths.
        n = size.worker_streams
        old.start("drain", [size.short_tokens if i % 4 < 2 else size.long_tokens for i in range(n)])
        if not await old.until_text():
            problems.append(f"not every stream had text within {START_TIMEOUT_S:g} s")
        on_victim = await asyncio.to_thread(_slots_used, stack, VICTIM)
        exits = Exits({VICTIM: proc})
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        not_serving = await asyncio.to_thread(_until_not_serving, stack, target, proc)
        new = Streams(client)
        new.start("after sigterm", [size.short_tokens] * size.new_streams)
        exited = await asyncio.to_thread(exits.wait, VICTIM, size.grace_s + EXIT_MARGIN_S)
        exits.close()
        judged = _sum(
            await old.finish(STREAM_TIMEOUT_S + 10), await new.finish(STREAM_TIMEOUT_S + 10)
        )
    # A new stream that ended on the victim before its process exited ran there.
    took_new = [
        i
        for i in range(len(new.streams))
        if new.worker_of(i) == VICTIM and exited is not None and new.ended_at.get(i, 0) < exited
    ]
    launcher = _wait_line(lines, (f"{VICTIM} ", "restarting it in"), 10)
    serving = _wait_line(lines, (f"{VICTIM} is SERVING again",), RECOVER_TIMEOUT_S)
    recovered = None
    if serving and "s after it stopped" in serving:
        recovered = float(serving.rsplit("(", 1)[1].split(" s after")[0])
    log = _first_log(target)
    started = re.search(r"draining: no new jobs; (\d+) running", log)
    handed = re.search(r"drained: (\d+) jobs still running", log)
    all_finished = "drained: every running job finished" in log
    running = int(started.group(1)) if started else None
    moved = int(handed.group(1)) if handed else (0 if all_finished else None)
    finished_there = running - moved if running is not None and moved is not None else None
    sched_log = _first_log(child(stack, "scheduler"))
    refused_placements = sched_log.count(f"worker {VICTIM} is draining")

    if not_serving is None or not_serving - t0 > NOT_SERVING_WITHIN_S:
        problems.append(f"{VICTIM} not NOT_SERVING within {NOT_SERVING_WITHIN_S:g} s of SIGTERM")
    if exited is None:
        problems.append(f"{VICTIM} still running {size.grace_s + EXIT_MARGIN_S:g} s after SIGTERM")
    elif proc.returncode != 0:
        problems.append(f"{VICTIM} ended with {proc.returncode} after SIGTERM, not 0")
    if on_victim == 0 or not running:
        problems.append(f"no job was running on {VICTIM} at SIGTERM: nothing drained")
    if started is None or moved is None:
        problems.append(f"{VICTIM}'s log has no draining/drained line")
    if took_new:
        problems.append(f"{len(took_new)} streams started after NOT_SERVING ran on {VICTIM}")
    if launcher is None:
        problems.append(f"the launcher said nothing of {VICTIM}'s exit")
    if serving is None:
        problems.append(f"{VICTIM} not SERVING again within {RECOVER_TIMEOUT_S:g} s")
    problems += judged.errors[:3]
    part: dict[str, Any] = {
        **judged.columns(),
        "streams": f"{n // 2}x{size.short_tokens} + {n - n // 2}x{size.long_tokens} tokens",
        "new_streams_after_sigterm": size.new_streams,
        "jobs_on_victim_at_sigterm": on_victim,
        "running_at_drain_start": running,
        "finished_there": finished_there,
        "moved": moved,
        "seconds_sigterm_to_not_serving": _since(t0, not_serving),
        "seconds_sigterm_to_exit": _since(t0, exited),
        "exit_code": proc.returncode,
        "new_streams_on_victim": len(took_new),
        "placements_refused_by_victim": refused_placements,
        "launcher": launcher.split("; its log:")[0] if launcher else None,
        "restarts": stack.restarts(VICTIM),
        "seconds_to_recover": recovered,
        "problems": problems,
    }
    return judged, part


async def _refuse_while_draining(
    stack: Stack, sched: subprocess.Popen[bytes], streams: Streams
) -> tuple[Counter[str], list[str]]:
    """New requests from SIGTERM until the admitted streams have ended (or the
    scheduler exited): each must be refused UNAVAILABLE. Counted by code, and
    ``draining`` for those whose message names the drain."""
    counts: Counter[str] = Counter()
    problems: list[str] = []
    health = child(stack, "scheduler")
    serving = True
    deadline = time.monotonic() + NOT_SERVING_WITHIN_S * 5
    while serving and sched.poll() is None and time.monotonic() < deadline:
        serving = await asyncio.to_thread(stack.healthy, health)
    if serving:
        problems.append(f"the scheduler not NOT_SERVING within {NOT_SERVING_WITHIN_S * 5:g} s")
        return counts, problems
    options = stack.client_options(timeout_seconds=5.0, retries=0)
    async with AsyncShortlineClient(options) as prober:
        i = 0
        while sched.poll() is None and not all(t.done() for t in streams.tasks):
            i += 1
            stream = prober.generate(f"late {i}", model="replay", max_tokens=5, ignore_eos=True)
            try:
                await stream.collect()
                counts["admitted"] += 1
                problems.append(f"request {i} admitted while the scheduler drained")
            except grpc.aio.AioRpcError as exc:
                counts[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.UNAVAILABLE and "draining" in str(exc.details()):
                    counts["draining"] += 1
                elif exc.code() != grpc.StatusCode.UNAVAILABLE:
                    problems.append(f"request {i} during the drain: {exc.code().name}")
            await asyncio.sleep(0.1)
    return counts, problems


async def _stack_drain(stack: Stack, lines: Lines, size: Size) -> tuple[Judged, dict[str, Any]]:
    """Part (b): stop the whole stack mid-stream (see the module docstring)."""
    procs = {c.name: c.process for c in stack.children if c.process is not None}
    sched = procs["scheduler"]
    problems: list[str] = []
    options = stack.client_options(timeout_seconds=STREAM_TIMEOUT_S)
    if not await asyncio.to_thread(_all_in_pool, stack, START_TIMEOUT_S):
        problems.append(f"not every worker in the scheduler's pool within {START_TIMEOUT_S:g} s")
    async with AsyncShortlineClient(options) as client:
        streams = Streams(client)
        streams.start("stop", [size.stack_tokens] * size.stack_streams)
        if not await streams.until_text():
            problems.append(f"not every stream had text within {START_TIMEOUT_S:g} s")
        exits = Exits(procs)
        t0 = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(stack.stop))
        counts, refusals = await _refuse_while_draining(stack, sched, streams)
        judged = await streams.finish(STREAM_TIMEOUT_S + 10)
        await stopping
        stopped = time.monotonic()
        await asyncio.to_thread(exits.wait, "triton", 5.0)
        exits.close()
    still = sorted(name for name, p in procs.items() if p.poll() is None)
    killed = [line for line in lines if "did not stop in" in line]
    log = _first_log(child(stack, "scheduler"))
    drained = re.search(r"drained: (every admitted request ended|\d+ requests unfinished)", log)
    at = {name: _since(t0, t) for name, t in exits.at.items()}
    sched_at = exits.at.get("scheduler")
    # The services the scheduler's drain needs (workers, Triton, the predictor) must
    # outlive it; the gateway is in front of the scheduler and may go first.
    first_other = min(
        (t for n, t in exits.at.items() if n not in ("scheduler", "gateway")), default=None
    )

    if still:
        problems.append(f"still running after stop(): {', '.join(still)}")
    problems += [line.removeprefix("shortline up: ") for line in killed]
    if drained is None:
        problems.append("the scheduler's log has no drained line")
    elif drained.group(1) != "every admitted request ended":
        problems.append(f"scheduler drained: {drained.group(1)}")
    if sched_at is None or (first_other is not None and first_other < sched_at):
        problems.append("a service exited before the scheduler had drained")
    problems += refusals
    problems += judged.errors[:3]
    part: dict[str, Any] = {
        **judged.columns(),
        "streams": f"{size.stack_streams}x{size.stack_tokens} tokens",
        "seconds_stop_to_all_exited": round(stopped - t0, 2),
        "seconds_to_exit": at,
        "refused_unavailable": counts["UNAVAILABLE"],
        "refused_naming_drain": counts["draining"],
        "refusals": dict(counts),
        "scheduler_drained": drained.group(1) if drained else None,
        "problems": problems,
    }
    return judged, part


def drain(quick: bool) -> dict[str, Any]:
    """SIGTERM a worker mid-stream, then stop the stack mid-stream (see the module docstring)."""
    size = QUICK if quick else FULL
    with running_stack(drain_grace_s=size.grace_s) as (stack, lines):
        worker, worker_part = asyncio.run(_worker_drain(stack, lines, size))
        if worker_part["seconds_to_recover"] is None:
            stack_part: dict[str, Any] = {"problems": ["skipped: worker-1 not serving again"]}
            whole = Judged()
        else:
            whole, stack_part = asyncio.run(_stack_drain(stack, lines, size))
    judged = _sum(worker, whole)
    problems = [f"worker: {p}" for p in worker_part["problems"]]
    problems += [f"stack: {p}" for p in stack_part["problems"]]
    w, s = worker_part, stack_part
    figure = (
        f"worker SIGTERM->exit {_cell(w['seconds_sigterm_to_exit'])} s "
        f"({w['finished_there']} finished there, {w['moved']} moved); "
        f"stack stop->all exited {_cell(s.get('seconds_stop_to_all_exited'))} s, "
        f"{s.get('refused_unavailable', 0)} new refused UNAVAILABLE"
    )
    return {
        "name": "drain",
        **judged.columns(),
        "seconds_to_recover": worker_part["seconds_to_recover"],
        "drain_grace_s": size.grace_s,
        "worker_drain": worker_part,
        "stack_drain": stack_part,
        "figure": figure,
        "problems": problems,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
