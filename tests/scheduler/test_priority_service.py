"""Priority in the service, without a network: a request's band reaches the core, a
restarted scheduler keeps it, a journal of the previous schema is migrated, and a
tenant's max_priority is enforced (``tenancy.priority_problem``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.core.bands import BandedQueue
from services.scheduler.service.clock import MonotonicClock
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.journal import Journal
from services.scheduler.service.journal_rows import write_band
from services.scheduler.service.tenancy import priority_problem
from shortline.common.auth import ANONYMOUS, Tenant, TokensFileError, parse_tokens
from shortline.scheduler.v1 import scheduler_pb2


def _generate(rid: str, priority: int | None = None) -> scheduler_pb2.GenerateRequest:
    request = scheduler_pb2.GenerateRequest(
        request_id=rid, prompt="hi", model="replay", max_tokens=30
    )
    if priority is not None:
        request.priority = priority
    return request


@pytest.mark.asyncio
async def test_the_band_and_tenant_reach_the_core_and_survive_a_restart(tmp_path: Path) -> None:
    cfg = SchedulerConfig(restart_reattach_s=5.0)
    path = tmp_path / "j.sqlite"
    plane = SchedulerService(cfg, None, Journal(path, MonotonicClock()))
    plane.start()
    high = plane.admit(_generate("high", 3), remaining=None, tenant="acme")
    low = plane.admit(_generate("low"), remaining=None, tenant="acme")
    for _ in range(20):  # fallback predictions, journaled, then Accepted
        await asyncio.sleep(0.01)
    assert high.job.priority == 3 and low.job.priority == 0 and high.job.tenant == "acme"
    assert isinstance(plane.core.queue, BandedQueue)
    assert [j.id for j in plane.core.queue if j.priority == 3] == ["acme/high"]
    assert plane.journal is not None
    plane.journal.commit()
    plane.journal._lock_file.close()  # a crash: only the lock goes with the process
    with sqlite3.connect(path) as conn:
        stored = dict(conn.execute("SELECT key, priority FROM bands"))
    assert stored == {"acme/high": 3}  # band 0 is not written

    plane2 = SchedulerService(cfg, None, Journal(path, MonotonicClock()))
    plane2.start()
    high2, low2 = plane2.lookup("high", "acme"), plane2.lookup("low", "acme")
    assert high2 is not None and low2 is not None
    assert high2.job.priority == 3 and low2.job.priority == 0
    assert high2.job.tenant == "acme"
    # The band still orders: the high job is first in the queue.
    assert plane2.core.queue.peek() is high2.job
    await plane2.close()


@pytest.mark.asyncio
async def test_the_journal_writes_the_band(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    plane = SchedulerService(SchedulerConfig(), None, Journal(path, MonotonicClock()))
    plane.start()
    plane.admit(_generate("high", 7), remaining=None, tenant="acme")
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert plane.journal is not None
    plane.journal.commit()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT key, priority FROM bands").fetchall() == [("acme/high", 7)]
    await plane.close()


def test_bands_live_beside_the_schema_and_go_with_their_request(tmp_path: Path) -> None:
    """A journal without the bands table (a scheduler before bands) gets it at open,
    without a new schema version (an older scheduler can still read the file); a band
    is forgotten with its request."""
    path = tmp_path / "j.sqlite"
    Journal(path, MonotonicClock()).close()
    with sqlite3.connect(path) as conn:  # what a scheduler before bands left behind
        conn.execute("DROP TRIGGER bands_forget")
        conn.execute("DROP TABLE bands")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(
            "INSERT INTO requests(key, request_id, tenant, arrival, model, length_model,"
            " prompt, max_tokens, sampling, fingerprint, reattach_grace)"
            " VALUES ('t/r', 'r', 't', 1.0, 'replay', '', 'hi', 5, x'', x'', 0)"
        )
    journal = Journal(path, MonotonicClock())
    (record,) = journal.load(ttl_s=600).live
    assert record.priority == 0
    journal.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
        write_band(conn, "t/r", 4)
    journal = Journal(path, MonotonicClock())
    (record,) = journal.load(ttl_s=600).live
    assert record.priority == 4
    journal.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM requests WHERE key='t/r'")
        assert conn.execute("SELECT count(*) FROM bands").fetchone()[0] == 0


def test_max_priority_caps_a_tenant_and_defaults_to_band_zero() -> None:
    entries = parse_tokens(
        '[[token]]\ntenant = "gold"\ntoken = "g"\nmax_priority = 5\n'
        '[[token]]\ntenant = "plain"\ntoken = "p"\n',
        "t.toml",
    )
    gold, plain = (e.tenant for e in entries)
    assert gold.max_priority == 5 and plain.max_priority == 0
    assert priority_problem(gold, _generate("a", 5)) is None
    assert priority_problem(plain, _generate("a")) is None  # absent = band 0
    assert priority_problem(plain, _generate("a", -3)) is None  # lower is always allowed
    why = priority_problem(plain, _generate("a", 2**31 - 1))
    assert why is not None and "max_priority 0" in why and "priority 2147483647" in why
    # No tokens file: the anonymous development tenant is not capped.
    assert priority_problem(ANONYMOUS, _generate("a", 2**31 - 1)) is None
    assert Tenant("x", None, None).may_ask(10**9) and not Tenant("x").may_ask(1)
    for bad in ('"5"', "true", "2147483648", "1.5"):
        with pytest.raises(TokensFileError, match="max_priority"):
            parse_tokens(f'[[token]]\ntenant = "t"\ntoken = "x"\nmax_priority = {bad}\n', "t")
