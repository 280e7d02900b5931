"""The fault benchmark: each scenario against a real stack on 127.0.0.1, one table.

    .venv/bin/python -m bench.faults [--quick] [--only fuzz[,NAME...]] [--out DIR]

A scenario is a function ``(quick) -> dict`` in :data:`SCENARIOS`; its dict has
at least the columns of :data:`COLUMNS` (None where a figure does not apply,
printed ``-``), a ``figure`` (its own headline, one short string) and
``problems`` (what missed the goal, empty when none). The goal of every
scenario: lost, hung, gaps, repeats and spliced all 0, no problem.

Writes ``faults.json`` in ``--out`` (default ``bench/results``): ``{"date",
"commit", "quick", "scenarios": [one object per scenario]}``; a run with
``--only`` replaces only its scenarios' objects. Exits 1 when a scenario
missed its goal.

Scenarios, numbered as in issue 16:

1. ``worker-kill``: kill -9 a worker with streams on it under ``shortline up``;
   exact replay texts, seconds until the launcher has it SERVING again
   (``bench/faults/worker_kill.py``).
2. ``triton-kill``: kill -9 the embedded Triton under the workers with streams
   running; workers pause (not dropped), jobs resume once the launcher has
   Triton back; figure: kill to Triton ready, to first token, to all streams
   done (``bench/faults/triton_kill.py``).
3. ``predictor-restart``: kill -9 the predictor with requests arriving before,
   during and after; those during the outage are admitted with fallback
   predictions; figure: fallbacks, kill to the first predictor prediction
   (``bench/faults/predictor_restart.py``).
4. ``scheduler-kill``: kill -9 the scheduler with streams running and queued,
   under ``shortline up``; the launcher restarts it, it reloads its admission
   journal and the SDK clients reattach; exact replay texts, no request run
   again, outcome rows of requests finished just before the kill all logged;
   figure: kill to all streams done, the journal's added delay p99
   (``bench/faults/scheduler_kill.py``).
5. ``drain``: SIGTERM one worker with streams on it (NOT_SERVING at once, no new
   job, its jobs finish there or move), then ``Stack.stop()`` mid-stream (every
   admitted stream exact, new ones refused UNAVAILABLE); figures: SIGTERM to
   exit, stop to all exited (``bench/faults/drain.py``).
6. ``heartbeat-stop``: SIGSTOP a worker with streams on it (no heartbeats, no
   closed socket), then SIGCONT; figure: SIGSTOP to all streams done
   (``bench/faults/heartbeat_stop.py``).
7. ``overload``: open-loop arrivals at 2x then 3x the stack's capacity (60 s
   each, 10 s with ``--quick``): refused at admission by status, completed,
   p99 of the admitted, refusal latency, RSS of every service
   (``bench/faults/overload.py``).
8. ``disconnects``: slot free time, p50/p99, per way a client goes away (sync
   and asyncio close, raw channel close, killed process, Cancel)
   (``bench/faults/disconnects.py``).
9. ``fuzz``: 10,000 generated messages (1,000 with ``--quick``) over every RPC
   of every service of an in-process stack (scheduler without tokens, one
   worker on an embedded Triton serving ``replay``, the predictor): counts the
   status of each call per RPC (``bench/faults/fuzz.py``).

``worker-kill-tls`` and ``scheduler-kill-tls``: scenarios 1 and 4 as deployed,
with TLS on every listener, mutual TLS between the services and a bearer token
for the clients (``shortline up --tls``).

The live scenarios share ``bench/faults/live.py`` (stack, replay judge, stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"
COLUMNS = (
    "accepted",
    "completed",
    "lost",
    "hung",
    "gaps",
    "repeats",
    "spliced",
    "seconds_to_recover",
)
# Columns whose goal is 0.
ZERO_GOAL = ("lost", "hung", "gaps", "repeats", "spliced")


def fuzz(quick: bool) -> dict[str, Any]:
    """Fuzzes every RPC of an in-process stack (see the module docstring)."""
    from bench.faults import fuzz as harness
    from bench.faults.inprocess import in_process_stack, replay_triton, scratch_dir

    n = 1_000 if quick else 10_000

    async def run(triton_url: str, workdir: Path) -> dict[str, Any]:
        async with in_process_stack(triton_url, workdir) as stack:
            return await harness.run(stack.targets, n, stack.hints, stack.templates)

    with replay_triton() as triton, scratch_dir() as workdir:
        result = asyncio.run(run(triton.grpc_url, workdir))
    problems = [f"{k} {result[k]}" for k in ("undefined", "tracebacks") if result[k]]
    problems += [f"after the fuzz: {p}" for p in result["still_failing"]]
    result["problems"] = problems
    result["figure"] = (
        f"{result['rpcs']} RPCs, UNKNOWN/INTERNAL {result['undefined']}, "
        f"tracebacks {result['tracebacks']}"
    )
    return result


def worker_kill(quick: bool) -> dict[str, Any]:
    """kill -9 a worker mid-stream under ``shortline up`` (``bench/faults/worker_kill.py``)."""
    from bench.faults.worker_kill import worker_kill as scenario

    return scenario(quick)


def worker_kill_tls(quick: bool) -> dict[str, Any]:
    """``worker-kill`` with TLS, mutual TLS between the services and a client token."""
    from bench.faults.worker_kill import worker_kill as scenario

    return {**scenario(quick, tls=True), "name": "worker-kill-tls"}


def heartbeat_stop(quick: bool) -> dict[str, Any]:
    """SIGSTOP a worker mid-stream, then SIGCONT (``bench/faults/heartbeat_stop.py``)."""
    from bench.faults.heartbeat_stop import heartbeat_stop as scenario

    return scenario(quick)


def disconnects(quick: bool) -> dict[str, Any]:
    """Slot free time per client kind of going away (``bench/faults/disconnects.py``)."""
    from bench.faults.disconnects import disconnects as scenario

    return scenario(quick)


def triton_kill(quick: bool) -> dict[str, Any]:
    """kill -9 the embedded Triton mid-stream (``bench/faults/triton_kill.py``)."""
    from bench.faults.triton_kill import triton_kill as scenario

    return scenario(quick)


def predictor_restart(quick: bool) -> dict[str, Any]:
    """kill -9 the predictor under a request stream (``bench/faults/predictor_restart.py``)."""
    from bench.faults.predictor_restart import predictor_restart as scenario

    return scenario(quick)


def overload(quick: bool) -> dict[str, Any]:
    """2x and 3x capacity, open loop (``bench/faults/overload.py``)."""
    from bench.faults.overload import overload as scenario

    return scenario(quick)


def drain(quick: bool) -> dict[str, Any]:
    """SIGTERM drain of a worker, then of the stack, mid-stream (``bench/faults/drain.py``)."""
    from bench.faults.drain import drain as scenario

    return scenario(quick)


def scheduler_kill(quick: bool) -> dict[str, Any]:
    """kill -9 the scheduler mid-stream, restarted (``bench/faults/scheduler_kill.py``)."""
    from bench.faults.scheduler_kill import scheduler_kill as scenario

    return scenario(quick)


def scheduler_kill_tls(quick: bool) -> dict[str, Any]:
    """``scheduler-kill`` with TLS, mutual TLS between the services and a client token."""
    from bench.faults.scheduler_kill import scheduler_kill as scenario

    return {**scenario(quick, tls=True), "name": "scheduler-kill-tls"}


SCENARIOS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "worker-kill": worker_kill,
    "triton-kill": triton_kill,
    "predictor-restart": predictor_restart,
    "scheduler-kill": scheduler_kill,
    "drain": drain,
    "heartbeat-stop": heartbeat_stop,
    "overload": overload,
    "disconnects": disconnects,
    "fuzz": fuzz,
    "worker-kill-tls": worker_kill_tls,
    "scheduler-kill-tls": scheduler_kill_tls,
}


def missed(result: dict[str, Any]) -> list[str]:
    """What in ``result`` misses the goal."""
    out = [f"{c} {result[c]}" for c in ZERO_GOAL if result.get(c)]
    return out + list(result.get("problems", []))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table(results: list[dict[str, Any]]) -> str:
    """One row per scenario: the common columns, its own figure, and whether it passed."""
    header = ["scenario", *COLUMNS, "goal", "figure"]
    rows = [
        [
            r["name"],
            *(_cell(r.get(c)) for c in COLUMNS),
            "met" if not missed(r) else "MISSED",
            str(r.get("figure", "")),
        ]
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    return "\n".join([head, "-" * len(head), *lines])


def status_table(result: dict[str, Any]) -> str:
    """The fuzz scenario's statuses per RPC."""
    from bench.faults.fuzz import Tally, table_rows

    tally = Tally()
    for name, counts in result.get("statuses", {}).items():
        tally.statuses[name] = Counter(counts)
    rows = list(table_rows(tally))
    width = max((len(name) for name, _, _ in rows), default=10)
    lines = [f"{'rpc'.ljust(width)}  calls  statuses"]
    lines += [f"{name.ljust(width)}  {calls:5d}  {text}" for name, calls, text in rows]
    return "\n".join(lines)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _merge(path: Path, results: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """faults.json with ``results`` replacing the scenarios of the same name."""
    previous: list[dict[str, Any]] = []
    if path.exists():
        try:
            previous = json.loads(path.read_text()).get("scenarios", [])
        except (json.JSONDecodeError, AttributeError):
            previous = []
    names = {r["name"] for r in results}
    kept = [r for r in previous if r.get("name") not in names]
    order = list(SCENARIOS)
    merged = sorted(
        [*kept, *results],
        key=lambda r: order.index(r["name"]) if r["name"] in order else len(order),
    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
        "quick": quick,
        "scenarios": merged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI size")
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    # Warnings and errors on the console; the scenarios count every line themselves.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message).300s")
    results = []
    for name in names:
        started = time.perf_counter()
        result = SCENARIOS[name](args.quick)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        results.append(result)
    print()
    print(table(results))
    for result in results:
        if "statuses" in result:
            print()
            print(status_table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "faults.json"
    path.write_text(json.dumps(_merge(path, results, args.quick), indent=1) + "\n")
    print(f"\nwrote {path}")
    failed = [f"{r['name']}: {', '.join(missed(r))}" for r in results if missed(r)]
    for line in failed:
        print(f"goal missed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
