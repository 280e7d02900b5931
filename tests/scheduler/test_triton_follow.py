"""Workers follow their Triton: a worker whose Triton dies stays registered but
gets no job; when its Triton is back (restarted on the same port) it serves
again within seconds and the waiting requests run.

The first test is the core alone (a worker present but not accepting work);
the second a real scheduler, a real worker and a Triton of its own, killed and
restarted (never the session's).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import replay_request, replay_text, stack, wait_for

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.policies import make_policy
from services.scheduler.core.scheduler import SchedulerCore
from services.worker.config import TritonServeConfig
from services.worker.service.server import WorkerServer
from shortline.common.net import free_port
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2


def _core() -> SchedulerCore:
    return SchedulerCore(
        make_policy("fcfs"), Batching(BatchingMode.CONTINUOUS, max_batch=2), VirtualClock()
    )


def _queue(core: SchedulerCore, name: str) -> Job:
    job = Job(name, arrival=0.0, max_tokens=10)
    core.submit(job)
    core.on_prediction(name, 5.0)
    return job


def test_a_worker_not_accepting_work_keeps_its_jobs_and_gets_no_new_one() -> None:
    core = _core()
    core.add_worker("a", 2)
    core.add_worker("b", 2)
    running = _queue(core, "running")
    (first,) = core.dispatch()
    assert isinstance(first, Assign)
    paused = first.worker_id
    other = "b" if paused == "a" else "a"
    assert core.set_accepting(paused, False)
    assert not core.set_accepting(paused, False)  # no change
    assert core.free_slots == 2  # only the other worker's
    for i in range(3):
        _queue(core, f"q{i}")
    placed = core.dispatch()
    assert [d.worker_id for d in placed if isinstance(d, Assign)] == [other, other]
    # Its running job ends normally; the slot it frees is not offered.
    core.on_finish("running", "stop", 5)
    assert running.state is JobState.DONE
    assert core.dispatch() == [] and core.free_slots == 0
    assert paused in core.workers  # present all along
    assert core.set_accepting(paused, True)
    assert core.free_slots == 2
    (resumed,) = core.dispatch()
    assert isinstance(resumed, Assign) and resumed.worker_id == paused
    # Lost while not accepting: its jobs are requeued, nothing is counted twice.
    core.set_accepting(paused, False)
    requeued = core.on_worker_lost(paused)
    assert [j.id for j in requeued] == [resumed.job.id]
    assert core.free_slots == 0 and paused not in core.workers


def test_the_core_reports_every_job_it_ends_once() -> None:
    core = _core()
    core.ended = []
    core.max_requeues = 0
    core.add_worker("a", 2)
    done, lost = _queue(core, "done"), _queue(core, "lost")
    core.dispatch()
    core.on_finish("done", "stop", 3)
    core.on_worker_lost("a")  # ``lost`` fails: no retry left
    cancelled = _queue(core, "cancelled")
    core.on_cancel("cancelled")
    core.on_cancel("cancelled")  # again: nothing new
    assert [(j.id, j.state) for j in core.ended] == [
        (done.id, JobState.DONE),
        (lost.id, JobState.FAILED),
        (cancelled.id, JobState.CANCELLED),
    ]


async def _start_triton(grpc_port: int, http_port: int) -> Any:
    from services.worker.triton.embedded import EmbeddedTriton

    triton = EmbeddedTriton(
        TritonServeConfig(
            models="replay",
            grpc_port=grpc_port,
            http_port=http_port,
            replay_step_a_ms=10.0,
            replay_step_b_ms=1.0,
        )
    )
    await asyncio.to_thread(triton.start)
    return triton


async def _generate(s: Any, rid: str, n: int) -> str:
    text = ""
    call = s.stub.Generate(replay_request(rid, n), timeout=600)
    async for msg in call:
        if msg.HasField("delta"):
            text += msg.delta.text
    return text


@pytest.mark.slow
async def test_a_worker_follows_its_triton_down_and_back_without_leaving_the_pool(
    tmp_path: Path,
) -> None:
    grpc_port, http_port = free_port(), free_port()
    triton = await _start_triton(grpc_port, http_port)
    tasks: list[asyncio.Task[str]] = []
    try:
        async with stack(triton.grpc_url, tmp_path, workers=1, slots=2) as s:
            plane = s.scheduler.plane
            worker: WorkerServer = s.workers[0]
            handle = plane.workers.get("w0")
            assert handle is not None and handle.serving
            assert await _generate(s, "before", 20) == replay_text(1, 20)

            # Triton dies mid-stream: the run breaks, the worker stays, nothing goes to it.
            running = asyncio.create_task(_generate(s, "through", 400))
            tasks.append(running)
            await wait_for(lambda: (r := plane.lookup("through")) is not None and r.tokens > 5)
            await asyncio.to_thread(triton.stop, 0.0)
            await wait_for(lambda: not worker.servicer.serving, timeout=5)
            await wait_for(lambda: not handle.serving, timeout=5)
            waiting = [asyncio.create_task(_generate(s, f"wait{i}", 30)) for i in range(3)]
            tasks += waiting
            await asyncio.sleep(1.5)  # several heartbeats: no drop, no re-registration
            assert plane.workers.get("w0") is handle
            assert not plane.core.workers["w0"].accepting
            assert plane.core.running == 0 and plane.core.queue_depth == 4
            assert not running.done() and not any(t.done() for t in waiting)
            async with grpc.aio.insecure_channel(s.scheduler.internal_address) as channel:
                stats = await internal_pb2_grpc.SchedulerInternalServiceStub(channel).GetStats(
                    scheduler_pb2.GetStatsRequest()
                )
            (status,) = stats.workers
            assert status.worker_id == "w0" and not status.alive
            assert list(status.models) == sorted(worker.servicer.models)

            # Back on the same port: serving again within seconds, and the queue drains.
            triton = await _start_triton(grpc_port, http_port)
            back = time.monotonic()
            await wait_for(lambda: worker.servicer.serving, timeout=10)
            serving_s = time.monotonic() - back
            await wait_for(lambda: handle.serving, timeout=10)
            dispatch_s = time.monotonic() - back
            await asyncio.wait([running, *waiting], timeout=20, return_when="FIRST_COMPLETED")
            first_s = time.monotonic() - back
            assert await running == replay_text(1, 400)  # resumed where it stopped
            assert [await t for t in waiting[1:]] == [replay_text(1, 30)] * 2
            assert plane.workers.get("w0") is handle  # the same registration throughout
            print(
                f"\nTriton back -> worker serving {serving_s:.2f} s, scheduler dispatching "
                f"{dispatch_s:.2f} s, first request done {first_s:.2f} s"
            )
            assert serving_s < 5.0 and dispatch_s < 5.0
    finally:
        # On a failure, no stream task is left to die later in another test's log.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(triton.stop, 0.0)
