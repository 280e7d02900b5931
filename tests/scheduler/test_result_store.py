"""Finished results kept for retried ids: bounded in count, not only by their TTL."""

from __future__ import annotations

from services.scheduler.core.job import Job
from services.scheduler.service.results import ResultStore
from services.scheduler.service.streams import Request
from shortline.common.v1 import common_pb2


def finished(i: int, at: float) -> Request:
    req = Request(f"r{i}", Job(f"r{i}", arrival=0.0), common_pb2.SamplingParams())
    req.finished_at = at
    return req


def test_the_store_keeps_at_most_max_results_dropping_the_oldest_unread() -> None:
    store = ResultStore(ttl_s=600.0, max_results=3)
    reading = finished(0, 1.0)
    reading.subscribers.add(object())  # type: ignore[arg-type]  # a client still reads it
    store.add(reading)
    for i in range(1, 6):
        store.add(finished(i, 1.0 + i))
    assert len(store) == 3
    assert store.get("r0") is reading  # never dropped under a reader
    assert [store.get(f"r{i}") is not None for i in range(1, 6)] == [False] * 3 + [True] * 2
