"""Scenario ``scheduler-kill``: kill -9 the scheduler mid-stream, under ``shortline up``.

Two workers of 6 slots; 20 long replay streams (16 with ``--quick``), so 12
run (fewer beside SmolLM2 streams) and the rest wait in the queue, each from
an SDK client that retries across the restart with the same id
(``retries``, ``reattach_grace_seconds``).
Just before the long streams start, a batch of short requests finishes: their
outcome rows must be in the outcome log afterwards although the kill comes
before the log's next flush (once a second).
Once every running stream has text, the scheduler gets SIGKILL; the launcher
restarts it, it reloads its journal (``services/scheduler/service/journal.py``)
and the clients reattach.

Judged per stream: the replay text shows a lost stretch (gap), a stretch
delivered twice (repeat) or another generation's text (splice) by itself; a
stream the SDK refused to splice (``StreamDivergedError``) counts as spliced.
A request is also checked not to have run twice: the tokens the workers
generated for the streams after the restart must be about what was left of
them, not their whole lengths again (``rerun_tokens``). ``seconds_to_recover``:
the kill to the scheduler SERVING again (the launcher's line); the figure adds
the kill to every stream done, and the journal's added delay (p99, from the
restarted scheduler's Prometheus histogram).

The full size adds sampled SmolLM2 streams (temperature 0.8): correct when the
text delivered before the kill is a prefix of the final text (no splice) and
the stream ends with a result.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.faults.live import (
    STREAM_TIMEOUT_S,
    Judged,
    judge_tasks,
    pid,
    running_stack,
    task_error,
)
from shortline.stack import Stack

VICTIM = "scheduler"
SMOLLM2 = "smollm2-135m-instruct"


def _options(stack: Stack) -> Any:
    # Retries that outlast a restart (0.2 s doubling: 25 s over 8 attempts), and a
    # grace that keeps each request for the client while it comes back.
    return stack.client_options(
        timeout_seconds=STREAM_TIMEOUT_S,
        retries=8,
        backoff_seconds=0.2,
        reattach_grace_seconds=30.0,
    )


async def _short_batch(stack: Stack, n: int) -> list[str]:
    """``n`` short requests, finished: their ids (for the outcome log check)."""
    from shortline.client import AsyncShortlineClient

    async with AsyncShortlineClient(_options(stack)) as client:
        streams = [
            client.generate(f"short {i}", model="replay", max_tokens=3, ignore_eos=True)
            for i in range(n)
        ]
        await asyncio.gather(*(s.collect() for s in streams))
    return [s.request_id for s in streams]


async def _wait(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _kill_mid_streams(
    stack: Stack, n: int, tokens: int, smollm2: int
) -> tuple[Judged, float, dict[str, Any]]:
    """SmolLM2 streams first (mid-generation at the kill), then the replay streams: as
    many as there are free slots run, the rest are accepted and queued (the short batch
    just before them: it would wait behind them); then the kill."""
    from shortline.client import AsyncGenerateStream, AsyncShortlineClient

    judged = Judged()
    extra: dict[str, Any] = {}
    async with AsyncShortlineClient(_options(stack)) as client:
        sampled: list[AsyncGenerateStream] = [
            client.generate(
                f"Write a long story about a lighthouse keeper, number {i}.",
                model=SMOLLM2,
                max_tokens=400,
                temperature=0.8,
            )
            for i in range(smollm2)
        ]
        tasks = [asyncio.create_task(s.collect()) for s in sampled]
        await _wait(lambda: all(s.text for s in sampled), 120.0)
        free = stack.cfg.workers * stack.cfg.slots - smollm2
        short_ids = await _short_batch(stack, 10)
        streams: list[AsyncGenerateStream] = [
            client.generate(f"stream {i}", model="replay", max_tokens=tokens, ignore_eos=True)
            for i in range(n)
        ]
        tasks = [*(asyncio.create_task(s.collect()) for s in streams), *tasks]
        await _wait(
            lambda: (
                sum(1 for s in streams if s.text) >= min(free, n)
                and all(s.accepted is not None for s in streams)
            )
        )
        before = {id(s): s.text for s in (*streams, *sampled)}
        extra["owed"] = sum(tokens - s.text.count(" replay") for s in streams)
        extra["queued_at_kill"] = sum(1 for s in streams if not s.text)
        os.kill(pid(stack, VICTIM), signal.SIGKILL)
        killed_at = time.monotonic()
        _done, pending = await asyncio.wait(tasks, timeout=STREAM_TIMEOUT_S + 30)
        extra["all_done_s"] = time.monotonic() - killed_at
        for task in pending:
            task.cancel()
        judge_tasks(judged, streams, tasks[:n], pending, tokens)
        judged.spliced += sum("StreamDivergedError" in e for e in judged.errors)
        extra["started_before_kill"] = sum(1 for s in streams if before[id(s)])
        # SmolLM2 streams: characters each had before the kill, and at the end.
        extra["smollm2_chars"] = [(len(before[id(s)]), len(s.text)) for s in sampled]
        for stream, task in zip(sampled, tasks[n:], strict=True):
            judged.accepted += 1
            error = task_error(task, pending)
            if task in pending:
                judged.hung += 1
            elif error is not None:
                judged.lost += 1
                judged.spliced += "StreamDivergedError" in error
                judged.errors.append(error)
            elif not stream.text.startswith(before[id(stream)]):
                judged.spliced += 1
            else:
                judged.completed += 1
        extra["short_ids"] = short_ids
    return judged, killed_at, extra


def _logged(path: Path, ids: list[str]) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        marks = ",".join("?" * len(ids))
        found = conn.execute(
            f"SELECT count(DISTINCT request_id) FROM outcomes WHERE request_id IN ({marks})", ids
        ).fetchone()
    return int(found[0])


def _metrics(port: int) -> list[str]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode()).splitlines()


def _histogram(lines: list[str], name: str) -> dict[str, float]:
    """A histogram of the restarted scheduler: le -> cumulative count."""
    out = {}
    for line in lines:
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def _replay_tokens(lines: list[str]) -> float:
    """Replay tokens the restarted scheduler streamed (its counter started at 0)."""
    prefix = 'shortline_generated_tokens_total{model="replay"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def _p99(buckets: dict[str, float]) -> str:
    total = buckets.get("+Inf", 0.0)
    if not total:
        return "-"
    for le, count in buckets.items():
        if count >= 0.99 * total:
            return f"<= {float(le) * 1e3:g} ms"
    return "-"


def scheduler_kill(quick: bool, tls: bool = False) -> dict[str, Any]:
    """kill -9 the scheduler mid-stream and let the launcher restart it (module docstring);
    ``tls``: TLS, mutual TLS and a token, as deployed."""
    # 2 workers x 6 slots: some replay streams run, the rest wait in the queue.
    n, tokens, smollm2 = (16, 300, 0) if quick else (20, 600, 4)
    with tempfile.TemporaryDirectory(prefix="shortline-schedkill-") as tmp:
        outcome_log = Path(tmp) / "outcomes.sqlite"
        journal = Path(tmp) / "journal.sqlite"
        models = "replay" if not smollm2 else f"replay,{SMOLLM2}"
        with running_stack(
            tls=tls,
            triton_models=models,
            slots=6,
            extra_scheduler_args=f"--outcome-log {outcome_log} --journal {journal}",
        ) as (stack, lines):
            judged, _killed, extra = asyncio.run(_kill_mid_streams(stack, n, tokens, smollm2))
            serving = lines.wait_for(f"{VICTIM} is SERVING again", 60)
            recovered = None
            if serving and "s after it stopped" in serving:
                recovered = float(serving.rsplit("(", 1)[1].split(" s after")[0])
            restarts = stack.restarts(VICTIM)
            metrics = _metrics(stack.cfg.metrics_base_port)
            delay = _histogram(metrics, "shortline_journal_delay_seconds")
            rerun = _replay_tokens(metrics) - extra["owed"]
        logged = _logged(outcome_log, extra["short_ids"])
    problems = list(judged.errors[:3])
    if restarts != 1:
        problems.append(f"{VICTIM} restarted {restarts} times, not once")
    if rerun > n:  # a little more is fine: the journal may hold more than a client had
        problems.append(
            f"after the restart the workers streamed {rerun:.0f} replay tokens more than "
            "the streams were owed: requests ran again from the start"
        )
    if logged != len(extra["short_ids"]):
        problems.append(
            f"outcome log has {logged} of the {len(extra['short_ids'])} requests "
            "finished just before the kill"
        )
    return {
        "name": "scheduler-kill",
        "tls": tls,
        **judged.columns(),
        "seconds_to_recover": recovered,
        "streams": n,
        "tokens": tokens,
        "smollm2_streams": smollm2,
        "started_before_kill": extra["started_before_kill"],
        "queued_at_kill": extra["queued_at_kill"],
        "smollm2_chars_before_and_after": extra["smollm2_chars"],
        "all_done_s": round(extra["all_done_s"], 2),
        "finished_before_kill_logged": f"{logged}/{len(extra['short_ids'])}",
        "journal_delay_p99": _p99(delay),
        "rerun_tokens": rerun,
        "figure": f"{n}+{smollm2} streams, scheduler killed; all done "
        f"{extra['all_done_s']:.1f} s after; outcome rows {logged}/{len(extra['short_ids'])}; "
        f"journal delay p99 {_p99(delay)}",
        "problems": problems,
    }
