"""The scheduler's per-message path, made cheaper for bench.relay (issue 21), keeps its
guarantees: a stream gets every published item once and in order however many wait
at one wake-up, ends at the request's end, and the journal's one UPDATE per request
per commit keeps everything a restart reads back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from services.scheduler.core.job import Job, JobState
from services.scheduler.service.clock import MonotonicClock
from services.scheduler.service.journal import Journal
from services.scheduler.service.streams import Inbox, Request, Subscription, follow
from shortline.common.outcomes import Outcome
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2


def _request(key: str = "acme/r1", rid: str = "r1") -> Request:
    clock = MonotonicClock()
    job = Job(key, arrival=clock.now() - 2.0, model="replay", prompt="hello", max_tokens=50)
    req = Request(rid, job, common_pb2.SamplingParams(seed=3), tenant="acme")
    job.attachment = req
    return req


def _result(rid: str, tokens: int) -> scheduler_pb2.GenerateResponse:
    return scheduler_pb2.GenerateResponse(
        result=scheduler_pb2.GenerateResult(request_id=rid, actual_tokens=tokens)
    )


@pytest.mark.asyncio
async def test_a_stream_gets_every_item_waiting_at_one_wake_up_in_order() -> None:
    req = _request()
    req.accepted = scheduler_pb2.Accepted(request_id="r1")
    req.publish()
    gone: list[Request] = []
    sub = Subscription(req, gone.append)
    seen: list[object] = []

    async def read() -> None:
        async for item in follow(sub):
            seen.append(item)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0)  # the reader sent Accepted and waits
    for i in range(5):  # published while the reader sleeps: one wake-up takes them all
        req.add_text(f" t{i}", 1)
    req.final = _result("r1", 5)
    req.publish()
    req.add_text(" late", 1)  # after the end: never sent
    await asyncio.wait_for(reader, 5.0)
    assert isinstance(seen[0], scheduler_pb2.GenerateResponse) and seen[0].HasField("accepted")
    texts = [m.delta.text for m in seen[1:-1]]  # type: ignore[attr-defined]
    assert texts == [f" t{i}" for i in range(5)]
    assert seen[-1] is req.final
    assert req.subscribers == set() and gone == []  # left at its end, nothing cancelled


@pytest.mark.asyncio
async def test_a_status_end_ends_the_stream_and_an_inbox_wakes_its_reader_once() -> None:
    req = _request()
    req.final = (grpc.StatusCode.UNAVAILABLE, "stopping")
    sub = Subscription(req, lambda _: None)
    req.publish()  # no Accepted: the status alone
    items = [item async for item in follow(sub)]
    assert items == [req.final]

    inbox = Inbox()
    taker = asyncio.create_task(inbox.take())
    await asyncio.sleep(0)
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert await asyncio.wait_for(taker, 5.0) == [1, 2]
    inbox.put_nowait(3)
    assert await inbox.take() == [3]  # waiting items: no wait


def test_a_request_admitted_and_ended_in_one_commit_reads_back_whole(tmp_path: Path) -> None:
    """Prediction, dispatch, text and the end all in one commit: one UPDATE of the row,
    and every part of it is what a restarted scheduler reads."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path, MonotonicClock())
    req = _request()
    journal.track(req)
    job = req.job
    job.predicted, job.prediction_source = 12.0, "predictor"
    req.accepted = scheduler_pb2.Accepted(request_id="r1", predicted_tokens=12.0)
    job.first_dispatch = job.arrival + 0.5
    job.first_token = job.arrival + 0.75
    job.preemptions, job.requeues, req.worker_id = 1, 2, "w-1"
    req.add_text(" a b", 2)
    job.state, job.finish_reason = JobState.DONE, "stop"
    req.finished_at = job.arrival + 1.0
    outcome = Outcome(
        ts=0.0,
        request_id="r1",
        model="replay",
        length_model="m",
        prompt="hello",
        predicted_tokens=12.0,
        actual_tokens=2,
        queue_wait_s=0.5,
        ttft_s=0.75,
        completion_s=1.0,
        preemptions=1,
        finish_reason="stop",
        prediction_source="predictor",
    )
    journal.outcome(req, outcome)
    req.final = _result("r1", 2)
    req.changed()
    journal.commit()
    assert journal.commits == 1
    loaded = journal.load(ttl_s=600)
    journal.close()
    (record,) = loaded.finished
    assert record.text == " a b" and record.tokens == 2
    assert record.predicted == 12.0 and record.source == "predictor"
    assert record.first_dispatch is not None and record.first_token is not None
    assert abs((record.first_token - record.first_dispatch) - 0.25) < 1e-3
    assert (record.preemptions, record.requeues, record.worker_id) == (1, 2, "w-1")
    assert record.final.result.actual_tokens == 2 and record.finish_reason == "stop"
    assert record.outcome is not None and record.outcome.actual_tokens == 2
    assert [r.key for r in loaded.unlogged] == ["acme/r1"]
