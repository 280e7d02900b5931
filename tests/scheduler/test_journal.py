"""The admission journal: write-ahead publishing, what a restart reloads, the file's rules.

The kill -9 of a real scheduler process under ``shortline up`` is the fault
benchmark's ``scheduler-kill`` scenario (run at its quick size by
``tests/benchmark/test_fault_bench.py``); here the journal and the data plane's restore
are driven directly, without a network.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import time
from pathlib import Path

import grpc
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.core.job import Job, JobState
from services.scheduler.service.clock import MonotonicClock
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.journal import Journal, JournalError, journal_path
from services.scheduler.service.streams import Request
from shortline.common.outcomes import OutcomeLog
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2


def _request(key: str = "acme/r1", rid: str = "r1", tenant: str = "acme") -> Request:
    clock = MonotonicClock()
    job = Job(key, arrival=clock.now() - 5.0, model="replay", prompt="hello", max_tokens=50)
    req = Request(
        rid,
        job,
        common_pb2.SamplingParams(temperature=0.5, seed=7),
        tenant=tenant,
        fingerprint=(b"a" * 32, b"b" * 32),
    )
    job.attachment = req
    return req


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def test_round_trip_keeps_what_a_restart_needs(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path, MonotonicClock())
    req = _request()
    journal.track(req)
    req.job.predicted, req.job.prediction_source = 42.0, "predictor"
    req.accepted = scheduler_pb2.Accepted(request_id="r1", predicted_tokens=42.0)
    req.add_text(" one", 1)
    req.add_text(" two", 1)
    journal.commit()
    req.add_text(" three", 1)
    journal.close()  # commits the last delta

    again = Journal(path, MonotonicClock())
    loaded = again.load(ttl_s=600)
    again.close()
    assert not loaded.finished
    (record,) = loaded.live
    assert (record.key, record.request_id, record.tenant) == ("acme/r1", "r1", "acme")
    assert record.text == " one two three" and record.tokens == 3
    assert record.predicted == 42.0 and record.source == "predictor"
    assert record.prompt == "hello" and record.max_tokens == 50
    assert common_pb2.SamplingParams.FromString(record.sampling).seed == 7
    assert record.fingerprint == (b"a" * 32, b"b" * 32)
    # Arrival is kept as wall-clock time: 5 s before the request was journaled.
    assert abs(time.time() - 5.0 - record.arrival) < 2.0


@pytest.mark.asyncio
async def test_streams_get_text_only_after_it_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path, MonotonicClock())
    req = _request()
    journal.track(req)
    queue: asyncio.Queue[object] = asyncio.Queue()
    req.subscribers.add(queue)
    req.add_text(" one", 1)
    req.add_text(" two", 1)
    # Not sent before the commit, which runs on the next loop turn.
    assert queue.empty() and req.shown == 0
    assert _rows(path, "SELECT count(*) FROM deltas") == [(0,)]
    await asyncio.sleep(0)
    item = queue.get_nowait()
    assert isinstance(item, scheduler_pb2.GenerateResponse)
    # Both deltas in one message, one row: the commit batches the loop turn's changes.
    assert item.delta.text == " one two" and item.delta.tokens == 2
    assert _rows(path, "SELECT text FROM deltas") == [(" one two",)]
    journal.close()


def test_an_interrupted_request_stays_live_and_a_finished_one_is_forgotten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path, MonotonicClock())
    stopped, done = _request("acme/a", "a"), _request("acme/b", "b")
    for req in (stopped, done):
        journal.track(req)
        req.add_text(" x", 1)
    stopped.final, stopped.interrupted = (grpc.StatusCode.UNAVAILABLE, "stopping"), True
    stopped.changed()
    done.job.state = JobState.DONE
    done.final = scheduler_pb2.GenerateResponse(
        result=scheduler_pb2.GenerateResult(request_id="b", actual_tokens=1)
    )
    done.finished_at = MonotonicClock().now()
    done.changed()
    journal.commit()
    loaded = journal.load(ttl_s=600)
    assert [r.key for r in loaded.live] == ["acme/a"]
    (finished,) = loaded.finished
    assert finished.final.result.actual_tokens == 1 and finished.prompt == ""
    assert finished.text == " x"
    journal.forget("acme/b")
    journal.commit()
    assert _rows(path, "SELECT key FROM requests") == [("acme/a",)]
    assert _rows(path, "SELECT key FROM deltas") == [("acme/a",)]
    journal.close()


def test_one_scheduler_per_journal_and_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path, MonotonicClock())
    with pytest.raises(JournalError, match="in use by another scheduler"):
        Journal(path, MonotonicClock())
    journal.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all, just text " * 100)
    with pytest.raises(JournalError, match=r"bad\.sqlite"):
        Journal(bad, MonotonicClock())
    assert journal_path("off", 1, tmp_path) is None
    default = journal_path("", 50051, tmp_path)
    assert default is not None and default.name == "scheduler-50051.journal.sqlite"


def _generate(rid: str, prompt: str = "hi") -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        request_id=rid, prompt=prompt, model="replay", max_tokens=30
    )


@pytest.mark.asyncio
async def test_a_restarted_plane_takes_back_queue_results_and_outcomes(tmp_path: Path) -> None:
    cfg = SchedulerConfig(restart_reattach_s=5.0)
    path = tmp_path / "j.sqlite"
    log_path = tmp_path / "outcomes.sqlite"
    outcome_log = OutcomeLog(log_path)
    plane = SchedulerService(cfg, outcome_log, Journal(path, MonotonicClock()))
    plane.start()
    waiting = plane.admit(_generate("w1"), remaining=None, tenant="acme")
    running = plane.admit(_generate("w2"), remaining=None, tenant="acme")
    finished = plane.admit(_generate("f1"), remaining=None, tenant="acme")
    for _ in range(20):  # predictions (fallback: no predictor) are journaled, then Accepted
        await asyncio.sleep(0.01)
    assert all(r.accepted is not None for r in (waiting, running, finished))
    running.add_text(" so far", 2)
    plane.cancel(finished)  # ends it: result, outcome row (not flushed yet)
    await asyncio.sleep(0)
    arrival_age = plane.clock.now() - waiting.job.arrival
    # A crash: nothing closed or flushed; only the lock goes with the process.
    assert plane.journal is not None
    plane.journal._lock_file.close()
    assert plane.results.outcome_log is not None

    plane2 = SchedulerService(cfg, OutcomeLog(log_path), Journal(path, MonotonicClock()))
    plane2.start()
    w1, w2 = plane2.lookup("w1", "acme"), plane2.lookup("w2", "acme")
    assert w1 is not None and w2 is not None
    assert w1.job.state is JobState.PREDICTED and w1.accepted is not None
    assert w2.text == " so far" and w2.tokens == 2 and w2.job.generated == 2
    # Original arrival (give or take the clock conversion), not the restart's.
    assert abs((plane2.clock.now() - w1.job.arrival) - arrival_age) < 1.0
    assert plane2.lookup("w1", "other") is None
    f1 = plane2.lookup("f1", "acme")
    assert f1 is not None and f1.final_shown and f1.job.finish_reason == "cancelled"
    # The cancelled request's outcome row, never flushed by the first plane, is logged.
    assert _rows(log_path, "SELECT request_id FROM outcomes") == [("f1",)]
    # Nobody reattaches: cancelled after restart_reattach_s, like a client that left.
    assert w1.disconnect_timer is not None
    await plane2.close()
    assert not os.path.exists(f"{path}-wal") or os.path.getsize(f"{path}-wal") == 0


async def test_a_request_refused_before_accepted_is_neither_kept_nor_journaled(
    tmp_path: Path,
) -> None:
    """Shed requests carry nothing to replay; kept, they grew the scheduler under
    sustained overload (bench.faults overload: +9 MB a minute)."""
    path = tmp_path / "j.sqlite"
    plane = SchedulerService(SchedulerConfig(), None, Journal(path, MonotonicClock()))
    plane.start()
    req = plane.admit(_generate("s1"), remaining=None, tenant="")
    plane.shed(req, "its deadline cannot be met")
    assert isinstance(req.final, tuple) and req.final[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert plane.lookup("s1") is None and len(plane.results.store) == 0
    await asyncio.sleep(0.01)
    assert _rows(path, "SELECT count(*) FROM requests") == [(0,)]
    await plane.close()


async def test_a_failed_commit_holds_the_text_back_and_is_retried(tmp_path: Path) -> None:
    """A full disk (here SQLite's own page limit: a real SQLITE_FULL) must not let text
    reach a client before it is written, nor leave it waiting once space is back."""
    journal = Journal(tmp_path / "j.sqlite", MonotonicClock())
    req = _request()
    journal.track(req)
    journal.commit()
    queue: asyncio.Queue[object] = asyncio.Queue()
    req.subscribers.add(queue)
    pages = journal._conn.execute("PRAGMA page_count").fetchone()[0]
    journal._conn.execute(f"PRAGMA max_page_count={pages}")
    req.add_text("x" * 50_000, 1)
    await asyncio.sleep(0)
    assert queue.empty() and req.shown == 0
    journal._conn.execute("PRAGMA max_page_count=1000000")
    item = await asyncio.wait_for(queue.get(), 5.0)
    assert isinstance(item, scheduler_pb2.GenerateResponse)
    assert item.delta.text == "x" * 50_000
    journal.close()


@pytest.mark.asyncio
async def test_commits_start_at_once_when_idle_and_at_most_every_gap_under_load(
    tmp_path: Path,
) -> None:
    """An idle scheduler writes a change on the next loop turn; changes that follow
    within COMMIT_GAP_S of a commit wait for one commit together (bench.relay: a
    transaction costs the same whatever it holds)."""
    from services.scheduler.service.journal import COMMIT_GAP_S

    journal = Journal(tmp_path / "j.sqlite", MonotonicClock())
    reqs = [_request(f"acme/r{i}", f"r{i}") for i in range(4)]
    for req in reqs:
        journal.track(req)
    await asyncio.sleep(0)  # the first commit: on the next loop turn
    assert journal.commits == 1
    await asyncio.sleep(COMMIT_GAP_S * 2)
    started = time.perf_counter()
    reqs[0].add_text(" a", 1)
    await asyncio.sleep(0)
    assert journal.commits == 2 and reqs[0].shown == 2  # idle again: at once
    for req in reqs:
        req.add_text(" b", 1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert journal.commits == 2 and all(r.shown_tokens < r.tokens for r in reqs)
    while journal.commits == 2:
        await asyncio.sleep(0.001)
    assert time.perf_counter() - started >= COMMIT_GAP_S * 0.9
    assert journal.commits == 3 and all(r.shown_tokens == r.tokens for r in reqs)
    journal.close()
