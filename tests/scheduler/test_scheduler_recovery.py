"""The scheduler service when things go wrong or change under it: lost workers,
preemption, retried ids, missed heartbeats, gone clients, deadlines, a dead
predictor, dynamic batching; and the simulator against the live stack."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import replay_text, stack, wait_for

from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2

pytestmark = pytest.mark.slow


async def test_a_dead_workers_job_resumes_elsewhere_in_one_seamless_stream(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path, workers=2) as s:
        call = s.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="survivor",
                model="replay",
                prompt="go",
                max_tokens=200,
                sampling=common_pb2.SamplingParams(ignore_eos=True),
            ),
            timeout=60,
        )
        msgs = []
        killed = ""
        async for msg in call:
            msgs.append(msg)
            tokens = sum(m.delta.tokens for m in msgs if m.HasField("delta"))
            if not killed and tokens >= 30:
                job = s.scheduler.plane.core.get("survivor")
                assert job is not None
                killed = job.worker
                victim = next(w for w in s.workers if w.worker_id == killed)
                await victim.stop(0)
        text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
        result = msgs[-1].result
        assert text == replay_text(1, 200)  # no gap, no repeat
        assert result.actual_tokens == 200
        assert result.worker_id not in ("", killed)
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert [w.worker_id for w in stats.workers] != [] and killed not in [
            w.worker_id for w in stats.workers
        ]


async def test_preempted_job_resumes_with_exactly_the_rest_of_its_text(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(
        embedded_triton.grpc_url,
        tmp_path,
        policy="sjf-oracle+preempt",
        benchmark_mode=True,
        preempt_factor=4.0,
        preempt_max_fraction=0.5,
    ) as s:
        long = asyncio.create_task(s.generate("long", 300))
        await wait_for(
            lambda: (req := s.scheduler.plane.lookup("long")) is not None and req.tokens >= 10
        )
        _, short_text = await s.generate("short", 5)
        long_msgs, long_text = await long
        assert short_text == replay_text(1, 5)
        assert long_text == replay_text(1, 300)
        assert long_msgs[-1].result.preemptions == 1
        assert long_msgs[-1].result.actual_tokens == 300
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.preemptions == 1


async def test_a_retried_request_id_attaches_and_never_runs_twice(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        first = asyncio.create_task(s.generate("same", 50))
        await wait_for(
            lambda: (req := s.scheduler.plane.lookup("same")) is not None and req.tokens >= 5
        )
        second_msgs, second_text = await s.generate("same", 50)
        first_msgs, first_text = await first
        assert first_text == second_text == replay_text(1, 50)
        assert first_msgs[-1].result == second_msgs[-1].result
        # After it finished, a retry replays the result.
        third_msgs, third_text = await s.generate("same", 50)
        assert third_text == first_text and third_msgs[-1].result == first_msgs[-1].result
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.completed == 1


async def test_a_worker_that_misses_three_heartbeats_is_dead_and_its_job_moves(
    embedded_triton: Any, tmp_path: Path
) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.service.server import WorkerServer

    url = embedded_triton.grpc_url
    async with stack(url, tmp_path, workers=0) as s:
        # Registered by hand and never heartbeating: alive for 3 x 0.2 s only.
        silent = WorkerServer(WorkerConfig(triton=url, slots=1, worker_id="silent"), url)
        await silent.start()
        try:
            async with grpc.aio.insecure_channel(s.scheduler.internal_address) as channel:
                await internal_pb2_grpc.SchedulerInternalServiceStub(channel).RegisterWorker(
                    scheduler_pb2.RegisterWorkerRequest(
                        worker_id="silent", address=silent.address, slots=1, models=["replay"]
                    )
                )
            call = s.stub.Generate(
                scheduler_pb2.GenerateRequest(
                    request_id="mover", model="replay", prompt="go", max_tokens=300
                ),
                timeout=60,
            )
            joined: list[WorkerServer] = []

            async def replace_when_dead() -> None:
                # Declared dead mid-job: a healthy worker joins and takes the job over.
                await wait_for(lambda: "silent" not in s.scheduler.plane.workers)
                healthy = WorkerServer(
                    WorkerConfig(
                        triton=url,
                        slots=1,
                        scheduler=s.scheduler.internal_address,
                        worker_id="ok",
                    ),
                    url,
                )
                await healthy.start()
                s.workers.append(healthy)
                joined.append(healthy)

            replacer = asyncio.create_task(replace_when_dead())
            msgs = [msg async for msg in call]
            await replacer
            healthy = joined[0] if joined else None
            text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
            assert healthy is not None
            assert text == replay_text(1, 300)
            assert msgs[-1].result.worker_id == "ok"
            # The dead worker's run was abandoned: its slot is free again.
            await wait_for(lambda: silent.servicer.slots.used == 0)
        finally:
            await silent.stop(0.1)


async def test_a_client_that_goes_away_gets_its_job_cancelled(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        call = s.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="gone", model="replay", prompt="go", max_tokens=3000
            )
        )
        async for msg in call:
            if msg.HasField("delta"):
                call.cancel()
                break
        core = s.scheduler.plane.core
        await wait_for(lambda: core.cancelled == 1 and core.running == 0, timeout=10)
        _, text = await s.generate("after", 3)
        assert text == replay_text(1, 3)


async def test_a_deadline_cancels_the_job_with_deadline_exceeded(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in s.stub.Generate(
                scheduler_pb2.GenerateRequest(
                    request_id="late", model="replay", prompt="go", max_tokens=3000
                ),
                timeout=0.5,
            ):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        core = s.scheduler.plane.core
        await wait_for(lambda: core.cancelled == 1 and core.running == 0, timeout=10)
        late = s.scheduler.plane.lookup("late")
        assert late is not None and late.job.finish_reason == "deadline"


async def test_an_unreachable_predictor_falls_back_and_is_counted(
    embedded_triton: Any, tmp_path: Path
) -> None:
    from shortline.common.net import free_port

    dead = f"127.0.0.1:{free_port()}"
    async with stack(
        embedded_triton.grpc_url, tmp_path, predictor=dead, predictor_timeout_ms=300
    ) as s:
        msgs, text = await s.generate("fb", 4)
        assert text == replay_text(1, 4)
        assert msgs[0].accepted.prediction_source == scheduler_pb2.PREDICTION_SOURCE_FALLBACK
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.predictor_fallbacks == 1


async def test_dynamic_batching_waits_for_a_batch_and_frees_its_slots_together(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(
        embedded_triton.grpc_url, tmp_path, slots=4, batching="dynamic", batch_wait_ms=300.0
    ) as s:
        loop = asyncio.get_running_loop()
        first: dict[str, float] = {}
        end: dict[str, float] = {}

        async def run(rid: str, n: int) -> None:
            call = s.stub.Generate(
                scheduler_pb2.GenerateRequest(
                    request_id=rid, model="replay", prompt="go", max_tokens=n
                ),
                timeout=60,
            )
            async for msg in call:
                if msg.HasField("delta") and rid not in first:
                    first[rid] = loop.time()
            end[rid] = loop.time()

        t0 = loop.time()
        batch = [asyncio.create_task(run("short", 10)), asyncio.create_task(run("long", 60))]
        await wait_for(lambda: "short" in end)
        late = asyncio.create_task(run("late", 5))
        await asyncio.gather(*batch, late)
        # Fewer than B=4 jobs: the batch left after the 300 ms wait, both together.
        assert first["short"] - t0 >= 0.3 and first["long"] - t0 >= 0.3
        assert abs(first["short"] - first["long"]) < 0.2
        # The late job waited for the whole batch (the long job) to end.
        assert first["late"] >= end["long"] - 0.05


async def test_the_simulator_models_the_live_stack(embedded_triton: Any, tmp_path: Path) -> None:
    """Same request sequence, live (replay worker, 4 slots) and simulated with the
    replay model's step times, read from the running Triton's configuration.

    The 10% agreement target is a benchmark figure (`shortline bench` reports live
    vs simulated mean JCT per cell); on a loaded CI machine the live side carries
    scheduling noise, so this test catches a wrong model (a missing batch term, a
    step counted twice), not the last few percent.
    """
    import time

    import numpy as np

    from services.scheduler.core.batching import Batching, BatchingMode
    from services.scheduler.core.policies import make_policy
    from services.scheduler.sim.engine import simulate
    from services.scheduler.sim.report import summarize
    from services.scheduler.sim.service_model import ServiceModel, capacity
    from services.scheduler.sim.workload import Workload, arrival_times

    n, slots = 120, 4
    rng = np.random.default_rng(7)
    true = np.maximum(1, rng.lognormal(3.6, 0.6, size=n).astype(np.int64))
    cfg = embedded_triton.config
    model = ServiceModel(cfg.replay_step_a_ms / 1e3, cfg.replay_step_b_ms / 1e3)
    batching = Batching(BatchingMode.CONTINUOUS, max_batch=slots)
    zeros = np.zeros(n, dtype=np.int64)
    arrivals = arrival_times(
        "poisson", n, 0.7 * capacity(model, batching, 1, slots, true, zeros), rng
    )
    work = Workload(arrivals, zeros, true, true.astype(np.float64), "oracle")
    sim = summarize(
        simulate(work, make_policy("fcfs"), batching, workers=1, slots=slots, model=model)
    )
    async with stack(
        embedded_triton.grpc_url, tmp_path, slots=slots, policy="fcfs", queue_limit=10_000
    ) as s:
        t0 = time.monotonic() + 0.2
        jct = np.zeros(n)

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
            start = time.monotonic()
            _, text = await s.generate(f"r{i}", int(true[i]))
            jct[i] = time.monotonic() - start
            assert text == replay_text(1, int(true[i]))

        await asyncio.gather(*(one(i) for i in range(n)))
    assert float(jct.mean()) == pytest.approx(sim["mean_jct_s"], rel=0.25)
