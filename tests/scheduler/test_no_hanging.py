"""No client left hanging: every job that ends, for any reason, ends its client
stream with a result or a status, once.

One test per way a job can end badly: its worker lost (stopped mid-stream, or
silent), its retries spent (every run refused), its worker's Triton down, the
predictor down (never there, or killed mid-run), the scheduler shutting down.
Every client asks for a deadline far above the expected end (``LONG_S``), so a
stream that the scheduler forgot would hang past the bound each test asserts.
Real sockets throughout: the in-process scheduler and workers of
``live_stack``, the session's embedded Triton, and a Triton of their own for
the tests that kill one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import Stack, replay_text, stack, wait_for

from services.worker.config import TritonServeConfig, WorkerConfig
from services.worker.service.registration import Membership, WorkerStatus, keep_registered
from services.worker.service.server import WorkerServer
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

LONG_S = 600.0  # the clients' deadline: far above any end expected here


@dataclass
class End:
    """How one client stream ended: ``code`` is OK with a result, else the status."""

    code: grpc.StatusCode
    details: str = ""
    text: str = ""
    result: scheduler_pb2.GenerateResult | None = None
    accepted: scheduler_pb2.Accepted | None = None
    seconds: float = 0.0
    msgs: list[Any] = field(default_factory=list)


async def stream(s: Stack, rid: str, max_tokens: int, prompt: str = "go") -> End:
    """One Generate stream to its end, however it ends."""
    started = time.monotonic()
    end = End(grpc.StatusCode.OK)
    call = s.stub.Generate(
        scheduler_pb2.GenerateRequest(
            request_id=rid,
            model="replay",
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=common_pb2.SamplingParams(ignore_eos=True),
        ),
        timeout=LONG_S,
    )
    try:
        async for msg in call:
            end.msgs.append(msg)
            if msg.HasField("accepted"):
                end.accepted = msg.accepted
            elif msg.HasField("delta"):
                end.text += msg.delta.text
            else:
                end.result = msg.result
    except grpc.aio.AioRpcError as exc:
        end.code, end.details = exc.code(), exc.details() or ""
    end.seconds = time.monotonic() - started
    if end.code is grpc.StatusCode.OK:
        assert end.result is not None, f"{rid}: the stream ended OK without a result"
    return end


async def all_end(tasks: list[asyncio.Task[End]], bound_s: float) -> list[End]:
    """Every stream's end, or a failure naming the streams still open after ``bound_s``."""
    _, pending = await asyncio.wait(tasks, timeout=bound_s)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} of {len(tasks)} streams still open after {bound_s} s"
    return [t.result() for t in tasks]


def running_on(s: Stack, rids: list[str]) -> dict[str, str]:
    """The worker each request runs on (all must be running)."""
    core = s.scheduler.plane.core
    return {rid: job.worker for rid in rids if (job := core.get(rid)) is not None}


async def outcome_rows(s: Stack, tmp_path: Path) -> dict[str, int]:
    """Outcome-log rows per request id (after a flush): one per ended request."""
    log = s.scheduler.plane.results.outcome_log
    assert log is not None
    await asyncio.to_thread(log.flush)
    with sqlite3.connect(tmp_path / "outcomes.sqlite") as conn:
        rows = conn.execute("SELECT request_id, COUNT(*) FROM outcomes GROUP BY request_id")
        return dict(rows.fetchall())


async def started(s: Stack, rids: list[str], tokens: int = 10) -> None:
    """Until every request runs and has streamed ``tokens``."""

    def ready() -> bool:
        plane = s.scheduler.plane
        reqs = [plane.lookup(rid) for rid in rids]
        return all(r is not None and r.job.worker and r.tokens >= tokens for r in reqs)

    await wait_for(ready, timeout=30)


@pytest.mark.parametrize("max_requeues", [0, 3])
async def test_a_worker_stopped_mid_stream_ends_every_stream(
    embedded_triton: Any, tmp_path: Path, max_requeues: int
) -> None:
    """With retries left its jobs resume elsewhere; without, they fail with a status.

    The second is the bug of the issue: the run whose stream broke was taken off
    the worker's runs before the lost worker's jobs were looked for there, so the
    job failed in the core (GetStats counted it) while its client waited forever."""
    async with stack(embedded_triton.grpc_url, tmp_path, workers=2, slots=2) as s:
        s.scheduler.plane.core.max_requeues = max_requeues
        rids = [f"lost{i}" for i in range(4)]
        tasks = [asyncio.create_task(stream(s, rid, 400)) for rid in rids]
        await started(s, rids)
        where = running_on(s, rids)
        victim = s.workers[0]
        on_victim = {rid for rid, w in where.items() if w == victim.worker_id}
        assert len(on_victim) == 2
        await victim.stop(0)
        ends = dict(zip(rids, await all_end(tasks, bound_s=30), strict=True))
        for rid, end in ends.items():
            if max_requeues == 0 and rid in on_victim:
                assert end.code is grpc.StatusCode.UNAVAILABLE, (rid, end.code, end.details)
                assert rid in end.details
            else:
                assert end.code is grpc.StatusCode.OK, (rid, end.code, end.details)
                assert end.text == replay_text(1, 400)
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.failed == (len(on_victim) if max_requeues == 0 else 0)
        assert stats.completed + stats.failed == len(rids)
        assert await outcome_rows(s, tmp_path) == {rid: 1 for rid in rids}  # exactly once


async def test_a_worker_that_goes_silent_fails_its_job_with_a_status(
    embedded_triton: Any, tmp_path: Path
) -> None:
    """Lost by missed heartbeats (its stream still open) with no retry left: the
    core fails the job while dropping the worker, and the client is told."""
    url = embedded_triton.grpc_url
    async with stack(url, tmp_path, workers=0) as s:
        s.scheduler.plane.core.max_requeues = 0
        silent = WorkerServer(WorkerConfig(slots=1, worker_id="silent"), url)
        await silent.start()
        try:
            # Registered by hand and never heartbeating: alive for 3 x 0.2 s only.
            async with grpc.aio.insecure_channel(s.scheduler.internal_address) as channel:
                await internal_pb2_grpc.SchedulerInternalServiceStub(channel).RegisterWorker(
                    scheduler_pb2.RegisterWorkerRequest(
                        worker_id="silent", address=silent.address, slots=1, models=["replay"]
                    )
                )
            task = asyncio.create_task(stream(s, "mute", 3000))
            (end,) = await all_end([task], bound_s=15)
            assert end.code is grpc.StatusCode.UNAVAILABLE, (end.code, end.details)
            assert "mute" in end.details and end.text  # it had started
            assert "silent" not in s.scheduler.plane.workers
            assert await outcome_rows(s, tmp_path) == {"mute": 1}
        finally:
            await silent.stop(0.1)


async def test_a_job_whose_every_run_is_refused_ends_once_its_retries_are_spent(
    embedded_triton: Any, tmp_path: Path
) -> None:
    """A worker that claims 3 slots but has 1, held by another caller: every run
    the scheduler starts there is refused (RESOURCE_EXHAUSTED, retryable); each
    job is requeued until its retries are spent, then its client gets the status."""
    url = embedded_triton.grpc_url
    async with stack(url, tmp_path, workers=0) as s:
        liar = WorkerServer(WorkerConfig(slots=1, worker_id="liar"), url)
        await liar.start()
        membership = Membership("liar", liar.address, 3, ("replay",))
        beats = asyncio.create_task(
            keep_registered(
                s.scheduler.internal_address,
                membership,
                lambda: WorkerStatus(slots_used=0, serving=True),
            )
        )
        channel = grpc.aio.insecure_channel(liar.address)
        hog = worker_pb2_grpc.WorkerServiceStub(channel).Execute(
            worker_pb2.ExecuteRequest(
                job_id="hog",
                model="replay",
                prompt="go",
                max_tokens=60000,
                sampling=common_pb2.SamplingParams(ignore_eos=True),
            )
        )
        try:
            await hog.read()  # the one slot is taken
            await wait_for(lambda: "liar" in s.scheduler.plane.workers)
            rids = [f"refused{i}" for i in range(3)]
            ends = await all_end([asyncio.create_task(stream(s, r, 50)) for r in rids], 15)
            for end in ends:
                assert end.code is grpc.StatusCode.RESOURCE_EXHAUSTED, (end.code, end.details)
                assert "slots" in end.details
            stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
            assert stats.failed == len(rids)
            assert await outcome_rows(s, tmp_path) == {rid: 1 for rid in rids}
        finally:
            hog.cancel()
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await channel.close(None)
            await liar.stop(0.1)


@pytest.fixture
async def own_triton() -> AsyncIterator[Any]:
    """A replay-only Triton of this test's own, to kill (never the session's)."""
    from services.worker.triton.embedded import EmbeddedTriton

    triton = EmbeddedTriton(
        TritonServeConfig(models="replay", replay_step_a_ms=10.0, replay_step_b_ms=1.0)
    )
    await asyncio.to_thread(triton.start)
    try:
        yield triton
    finally:
        await asyncio.to_thread(triton.stop, 0.0)


async def _add_worker(s: Stack, worker_id: str, triton_url: str, slots: int) -> WorkerServer:
    w = WorkerServer(
        WorkerConfig(
            slots=slots,
            worker_id=worker_id,
            scheduler=s.scheduler.internal_address,
            health_poll_s=0.5,
            # As the pool's other workers: its own Triton serves only replay, and a
            # worker registering what its Triton serves would be another pool.
            models="smollm2-135m-instruct=smollm2:4096,replay=raw:65536",
        ),
        triton_url,
    )
    await w.start()
    s.workers.append(w)
    await wait_for(lambda: worker_id in s.scheduler.plane.workers)
    return w


@pytest.mark.parametrize("max_requeues", [0, 3])
async def test_a_triton_killed_mid_stream_ends_every_stream(
    embedded_triton: Any, own_triton: Any, tmp_path: Path, max_requeues: int
) -> None:
    """Jobs on the worker whose Triton died resume on the other worker (or, with no
    retry left, fail with a status naming Triton); none is left open."""
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=2) as s:
        s.scheduler.plane.core.max_requeues = max_requeues
        await _add_worker(s, "on-own", own_triton.grpc_url, 2)
        rids = [f"tk{i}" for i in range(4)]
        tasks = [asyncio.create_task(stream(s, rid, 400)) for rid in rids]
        await started(s, rids)
        doomed = {rid for rid, w in running_on(s, rids).items() if w == "on-own"}
        assert len(doomed) == 2
        await asyncio.to_thread(own_triton.stop, 0.0)
        ends = dict(zip(rids, await all_end(tasks, bound_s=30), strict=True))
        for rid, end in ends.items():
            if max_requeues == 0 and rid in doomed:
                assert end.code is grpc.StatusCode.UNAVAILABLE, (rid, end.code, end.details)
                assert own_triton.grpc_url in end.details
            else:
                assert end.code is grpc.StatusCode.OK, (rid, end.code, end.details)
                assert end.text == replay_text(1, 400)
                assert end.result is not None and end.result.worker_id == "w0"
        assert await outcome_rows(s, tmp_path) == {rid: 1 for rid in rids}


async def test_a_worker_whose_triton_is_unreachable_gets_no_job(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=2) as s:
        await _add_worker(s, "no-triton", f"127.0.0.1:{free_port()}", 4)
        rids = [f"ut{i}" for i in range(6)]
        ends = await all_end([asyncio.create_task(stream(s, r, 30)) for r in rids], 30)
        for end in ends:
            assert end.code is grpc.StatusCode.OK, (end.code, end.details)
            assert end.text == replay_text(1, 30)
            assert end.result is not None and end.result.worker_id == "w0"
        assert "no-triton" in s.scheduler.plane.workers  # present, just not used


async def test_an_unreachable_predictor_never_holds_a_request(
    embedded_triton: Any, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with stack(
        embedded_triton.grpc_url, tmp_path, slots=4, predictor=dead, predictor_timeout_ms=300
    ) as s:
        rids = [f"np{i}" for i in range(5)]
        ends = await all_end([asyncio.create_task(stream(s, r, 20)) for r in rids], 30)
        for end in ends:
            assert end.code is grpc.StatusCode.OK, (end.code, end.details)
            assert end.text == replay_text(1, 20)
            assert end.accepted is not None
            assert end.accepted.prediction_source == scheduler_pb2.PREDICTION_SOURCE_FALLBACK


async def test_a_predictor_killed_mid_run_leaves_requests_to_the_fallback(
    embedded_triton: Any, tmp_path: Path
) -> None:
    from services.predictor.config import PredictorConfig
    from services.predictor.service import PredictorServer

    pcfg = PredictorConfig(port=free_port(), threads=1)
    predictor = PredictorServer(pcfg)
    await predictor.start()
    try:
        async with stack(
            embedded_triton.grpc_url,
            tmp_path,
            slots=4,
            predictor=pcfg.address,
            predictor_timeout_ms=10_000,  # calls end by the kill, not by this
        ) as s:
            first = await stream(s, "before", 5, prompt="Say yes.")
            assert first.accepted is not None
            assert first.accepted.prediction_source == scheduler_pb2.PREDICTION_SOURCE_PREDICTOR
            rids = [f"pk{i}" for i in range(12)]
            tasks = []
            for i, rid in enumerate(rids):
                tasks.append(asyncio.create_task(stream(s, rid, 20, prompt=f"Question {i}?")))
                if i == 3:
                    await predictor.stop(0)  # Predict calls in flight are cut off
                await asyncio.sleep(0.01)
            ends = await all_end(tasks, bound_s=30)
            for end in ends:
                assert end.code is grpc.StatusCode.OK, (end.code, end.details)
                assert end.text == replay_text(1, 20)
            sources = [e.accepted.prediction_source for e in ends if e.accepted is not None]
            assert len(sources) == len(rids)
            assert sources[-1] == scheduler_pb2.PREDICTION_SOURCE_FALLBACK
    finally:
        await predictor.stop(0)


async def test_a_scheduler_shutting_down_ends_every_open_stream(
    embedded_triton: Any, tmp_path: Path
) -> None:
    """Running, queued: every stream gets an answer while the scheduler stops."""
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=2) as s:
        rids = [f"sd{i}" for i in range(5)]
        tasks = [asyncio.create_task(stream(s, rid, 3000)) for rid in rids]
        await wait_for(
            lambda: s.scheduler.plane.core.running == 2 and s.scheduler.plane.core.queue_depth == 3
        )
        await s.scheduler.stop(0.5)
        for end in await all_end(tasks, bound_s=10):
            assert end.code is not grpc.StatusCode.OK or end.result is not None
            assert end.code is not grpc.StatusCode.DEADLINE_EXCEEDED
            assert end.seconds < LONG_S / 10
