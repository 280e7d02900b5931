"""Scenario ``overload``: open-loop arrivals at 2x, then 3x, the stack's capacity.

Before admission control, 3x capacity for 60 s was refused nothing: the queue
grew to 983 of 1000, p99 completion reached 120 s and the scheduler grew from
106 to 182 MB. What must hold instead: the excess is refused at admission at
once (``RESOURCE_EXHAUSTED`` on a full queue or a tenant over its share,
``DEADLINE_EXCEEDED`` before ``Accepted`` when the deadline cannot be met),
every admitted request completes with its exact replay text within its
deadline, the stack keeps completing at capacity, and memory stays flat.

Capacity is computed, not guessed: the replay model's shared step lasts
``a + b * batch`` ms, so with every slot busy (``workers * slots`` sequences) a
request of ``TOKENS`` tokens takes ``TOKENS * step`` seconds and the stack
completes ``workers * slots / (TOKENS * step)`` per second. The completions
per second measured while the queue is full are reported beside it.

Arrivals are Poisson (seeded) from one asyncio SDK client, never waiting for
an answer. Every other request has a tight deadline (shed as soon as a few
jobs wait) and the rest a loose one (refused only when the queue is full), so
both refusals act. The scheduler's queue limit is small enough for the quick
run to fill it, and its shedding margin negative (refuse when the estimate
exceeds 75% of the deadline), since the default +20% admits, by design,
requests that will miss their deadline. The RSS of every service (its process
tree: Triton's stubs included) is sampled throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
import psutil

from bench.faults.live import Judged, judge, pid, replay_text, running_stack
from shortline.client import AsyncShortlineClient
from shortline.common.stats import percentile
from shortline.stack import Stack

WORKERS, SLOTS = 2, 8
STEP_A_MS, STEP_B_MS = 60.0, 2.5  # a full batch of 16 steps in 100 ms
TOKENS = 20
QUEUE_LIMIT = 32  # about 4 s of waiting at capacity
SHED_MARGIN = -0.25
DEADLINES_S = (4.0, 10.0)  # tight, loose: alternate requests
LEVELS = (2.0, 3.0)
HANG_MARGIN_S = 10.0  # a stream still open this long after its deadline is hung
SAMPLE_S = 0.25
# Goals besides the zero columns.
REFUSAL_P99_BOUND_S = 0.5
SCHEDULER_GROWTH_BOUND_MB = 50.0  # between the 2x and the 3x windows' ends
MIN_THROUGHPUT_SHARE = 0.7  # of computed capacity, while the queue is full

SERVICES = ("scheduler", *(f"worker-{i + 1}" for i in range(WORKERS)), "predictor", "triton")


def step_seconds(batch: int) -> float:
    return (STEP_A_MS + STEP_B_MS * batch) / 1000.0


def capacity_rps() -> float:
    """Requests per second with every slot busy (see the module docstring)."""
    batch = WORKERS * SLOTS
    return batch / (TOKENS * step_seconds(batch))


@dataclass
class Outcome:
    """One request as its client saw it."""

    level: float
    deadline_s: float
    sent: float
    ended: float = 0.0
    kind: str = "hung"  # completed, refused-full, refused-tenant, shed, lost, hung
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.sent


def _classify(code: grpc.StatusCode, details: str, accepted: bool) -> str:
    """A refusal at admission comes before ``Accepted``; anything else is an admitted
    request that ended in error (lost)."""
    if not accepted and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "refused-tenant" if "tenant" in details else "refused-full"
    if not accepted and code == grpc.StatusCode.DEADLINE_EXCEEDED and "cannot be met" in details:
        return "shed"
    return "lost"


async def _one(client: AsyncShortlineClient, out: Outcome, judged: Judged, index: int) -> None:
    stream = client.generate(
        f"Write a long, detailed essay on subject {index} of the overload run.",
        model="replay",
        max_tokens=TOKENS,
        ignore_eos=True,
        timeout=out.deadline_s,
    )
    try:
        await asyncio.wait_for(stream.collect(), out.deadline_s + HANG_MARGIN_S)
    except TimeoutError:
        out.ended = time.monotonic()
        judge(judged, stream.text, TOKENS, error=None, hung=True)
        return
    except grpc.aio.AioRpcError as exc:
        out.ended = time.monotonic()
        out.kind = _classify(exc.code(), exc.details() or "", stream.accepted is not None)
        out.error = f"{exc.code().name}: {(exc.details() or '')[:160]}"
    except Exception as exc:  # the SDK's own errors (a diverged stream): lost, not a crash
        out.ended = time.monotonic()
        out.kind, out.error = "lost", repr(exc)[:200]
    else:
        out.ended = time.monotonic()
        out.kind = "completed"
    if out.kind in ("completed", "lost"):
        judge(judged, stream.text, TOKENS, error=out.error, hung=False)
        if out.kind == "completed" and stream.text != replay_text(TOKENS):
            out.kind = "lost"


class Rss:
    """The RSS of each service's process tree, sampled in a thread; named marks."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self.peak: dict[str, float] = {}
        self.marks: dict[str, dict[str, float]] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def sample(self) -> dict[str, float]:
        """MB per service: the child and its descendants (Triton's stubs count)."""
        out: dict[str, float] = {}
        for name in SERVICES:
            try:
                root = psutil.Process(pid(self._stack, name))
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                out[name] = total / 2**20
            except (psutil.Error, AssertionError):
                continue
        return out

    def _take(self) -> dict[str, float]:
        now = self.sample()
        for name, mb in now.items():
            self.peak[name] = max(self.peak.get(name, 0.0), mb)
        return now

    def _run(self) -> None:
        while not self._halt.wait(SAMPLE_S):
            self._take()

    def mark(self, label: str) -> None:
        self.marks[label] = self._take()

    def __enter__(self) -> Rss:
        self.mark("start")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(5)

    def report(self) -> dict[str, dict[str, float]]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 1)

        rows: dict[str, dict[str, Any]] = {}
        for name in SERVICES:
            row = {label: r(m.get(name)) for label, m in self.marks.items()}
            row["peak"] = r(self.peak.get(name))
            start, end = self.marks["start"].get(name), self.marks.get("end", {}).get(name)
            row["growth"] = r(end - start) if start is not None and end is not None else None
            rows[name] = row
        return rows


async def _warm_up(client: AsyncShortlineClient) -> None:
    """One full batch: the scheduler learns its seconds per token at full load (what
    deadline shedding plans with) and every path is warm before the windows."""
    streams = [
        client.generate(f"warm-up {i}", model="replay", max_tokens=TOKENS, ignore_eos=True)
        for i in range(WORKERS * SLOTS)
    ]
    await asyncio.gather(*(s.collect() for s in streams))


async def _drive(stack: Stack, window_s: float, rss: Rss) -> tuple[list[Outcome], Judged, float]:
    """The two windows back to back, then waits for every request; returns the
    outcomes, the judged admitted streams and the seconds from the end of the
    load until the last request ended."""
    options = stack.client_options(retries=0)
    judged = Judged()
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    rng = random.Random(16)
    async with AsyncShortlineClient(options) as client:
        await _warm_up(client)
        rss.mark("start")
        for level in LEVELS:
            rate = level * capacity_rps()
            started = time.monotonic()
            at = started
            while True:
                at += rng.expovariate(rate)
                if at >= started + window_s:
                    break
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                i = len(outcomes)
                out = Outcome(level, DEADLINES_S[i % len(DEADLINES_S)], time.monotonic())
                outcomes.append(out)
                tasks.append(asyncio.create_task(_one(client, out, judged, i)))
            await asyncio.sleep(max(0.0, started + window_s - time.monotonic()))
            rss.mark(f"end_{level:g}x")
        load_ended = time.monotonic()
        await asyncio.gather(*tasks)
        drained = time.monotonic() - load_ended
    rss.mark("end")
    return outcomes, judged, drained


def _q(values: list[float], q: float) -> float | None:
    return round(percentile(values, q), 3) if values else None


def _level(outcomes: list[Outcome], level: float, window_s: float) -> dict[str, Any]:
    mine = [o for o in outcomes if o.level == level]
    kinds = Counter(o.kind for o in mine)
    refused = kinds["refused-full"] + kinds["refused-tenant"] + kinds["shed"]
    admitted = [o for o in mine if o.kind in ("completed", "lost", "hung")]
    done = [o.seconds for o in mine if o.kind == "completed"]
    refusals = [o.seconds for o in mine if o.kind in ("refused-full", "refused-tenant", "shed")]
    full = [o.seconds for o in mine if o.kind in ("refused-full", "refused-tenant")]
    shed = [o.seconds for o in mine if o.kind == "shed"]
    # Completions that ended inside this level's window, after its first service time
    # (the 2x window starts with idle slots): the stack's throughput.
    service = TOKENS * step_seconds(WORKERS * SLOTS)
    first = min((o.sent for o in mine), default=0.0) + service
    span = window_s - service
    end = first + span
    in_window = [o for o in outcomes if o.kind == "completed" and first <= o.ended < end]
    return {
        "offered": len(mine),
        "offered_rps": round(len(mine) / window_s, 2),
        "refused": refused,
        "refused_fraction": round(refused / len(mine), 3) if mine else None,
        "refused_by_status": {
            "RESOURCE_EXHAUSTED queue full": kinds["refused-full"],
            "RESOURCE_EXHAUSTED tenant cap": kinds["refused-tenant"],
            "DEADLINE_EXCEEDED shed": kinds["shed"],
        },
        "admitted": len(admitted),
        "completed": kinds["completed"],
        "lost": kinds["lost"],
        "hung": kinds["hung"],
        "completion_p50_s": _q(done, 50),
        "completion_p99_s": _q(done, 99),
        "completion_max_s": round(max(done), 3) if done else None,
        "refusal_p50_s": _q(refusals, 50),
        "refusal_p99_s": _q(refusals, 99),
        "refusal_p99_s_by_status": {
            "RESOURCE_EXHAUSTED": _q(full, 99),
            "DEADLINE_EXCEEDED shed": _q(shed, 99),  # after the prediction
        },
        "completed_per_s_in_window": round(len(in_window) / span, 2),
    }


def _problems(
    levels: dict[str, dict[str, Any]],
    rss: dict[str, dict[str, Any]],
    outcomes: list[Outcome],
    restarts: dict[str, int],
) -> list[str]:
    problems = [o.error for o in outcomes if o.kind == "lost" and o.error][:3]
    capacity = capacity_rps()
    for name, lv in levels.items():
        if not lv["refused"]:
            problems.append(f"{name}: nothing refused at admission")
        p99 = lv["refusal_p99_s"]
        if p99 is not None and p99 > REFUSAL_P99_BOUND_S:
            problems.append(f"{name}: refusal p99 {p99:.2f} s > {REFUSAL_P99_BOUND_S} s")
        throughput = lv["completed_per_s_in_window"]
        if throughput < MIN_THROUGHPUT_SHARE * capacity:
            problems.append(
                f"{name}: {throughput:.1f} completions/s < {MIN_THROUGHPUT_SHARE:.0%} of "
                f"capacity {capacity:.1f}/s"
            )
    sched = rss["scheduler"]
    a, b = sched.get(f"end_{LEVELS[0]:g}x"), sched.get(f"end_{LEVELS[-1]:g}x")
    if a is None or b is None:
        problems.append("scheduler RSS not sampled")
    elif b - a >= SCHEDULER_GROWTH_BOUND_MB:
        problems.append(
            f"scheduler RSS grew {b - a:.0f} MB from the end of {LEVELS[0]:g}x to the end of "
            f"{LEVELS[-1]:g}x (bound {SCHEDULER_GROWTH_BOUND_MB:.0f} MB)"
        )
    for name, n in restarts.items():
        if n:
            problems.append(f"{name} restarted {n} times under overload")
    return problems


def overload(quick: bool) -> dict[str, Any]:
    """2x then 3x capacity, open loop (see the module docstring)."""
    window_s = 10.0 if quick else 60.0
    extra = f"--queue-limit {QUEUE_LIMIT} --deadline-shed-margin {SHED_MARGIN}"
    with running_stack(
        workers=WORKERS,
        slots=SLOTS,
        replay_step_a_ms=STEP_A_MS,
        replay_step_b_ms=STEP_B_MS,
        extra_scheduler_args=extra,
    ) as (stack, _lines):
        with Rss(stack) as rss:
            outcomes, judged, drained = asyncio.run(_drive(stack, window_s, rss))
        restarts = {name: stack.restarts(name) for name in SERVICES}
    levels = {f"{lv:g}x": _level(outcomes, lv, window_s) for lv in LEVELS}
    # Admitted = got Accepted (the judge counts a stream accepted only once it has text).
    judged.accepted = sum(lv["admitted"] for lv in levels.values())
    memory = rss.report()
    problems = _problems(levels, memory, outcomes, restarts)
    last = levels[f"{LEVELS[-1]:g}x"]
    sched = memory["scheduler"]
    growth = (sched[f"end_{LEVELS[-1]:g}x"] or 0.0) - (sched[f"end_{LEVELS[0]:g}x"] or 0.0)
    p99 = last["completion_p99_s"]
    figure = (
        f"{LEVELS[-1]:g}x: refused {100 * (last['refused_fraction'] or 0):.0f}%, "
        f"p99 admitted {'-' if p99 is None else f'{p99:.1f}'} s, "
        f"scheduler RSS {growth:+.0f} MB"
    )
    return {
        "name": "overload",
        **judged.columns(),
        "seconds_to_recover": round(drained, 2),
        "capacity_rps": round(capacity_rps(), 2),
        "capacity_how": (
            f"computed: {WORKERS} workers x {SLOTS} slots / ({TOKENS} tokens x "
            f"{step_seconds(WORKERS * SLOTS) * 1000:.0f} ms replay step at batch "
            f"{WORKERS * SLOTS}); measured: completed_per_s_in_window"
        ),
        "window_seconds": window_s,
        "deadlines_s": list(DEADLINES_S),
        "queue_limit": QUEUE_LIMIT,
        "deadline_shed_margin": SHED_MARGIN,
        "levels": levels,
        "rss_mb": memory,
        "rss_bound": (
            f"scheduler growth < {SCHEDULER_GROWTH_BOUND_MB:.0f} MB between the ends of "
            f"the {LEVELS[0]:g}x and {LEVELS[-1]:g}x windows"
        ),
        "figure": figure,
        "problems": problems,
    }
