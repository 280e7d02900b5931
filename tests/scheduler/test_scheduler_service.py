"""The scheduler service over real gRPC, with real workers on an embedded Triton
(the ``replay`` model: exactly max_tokens tokens reading " replay1 replay2 ...",
numbering continued on resume, so a gap or a repeat shows in the text)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.server import SchedulerServer
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow


def replay_text(first: int, last: int) -> str:
    return "".join(f" replay{i}" for i in range(first, last + 1))


@dataclass
class Stack:
    scheduler: SchedulerServer
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    workers: list[Any] = field(default_factory=list)

    async def generate(
        self, request_id: str, max_tokens: int, prompt: str = "go", **kw: Any
    ) -> tuple[list[scheduler_pb2.GenerateResponse], str]:
        msgs = []
        call = self.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id=request_id,
                model=kw.pop("model", "replay"),
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=common_pb2.SamplingParams(ignore_eos=True),
                **kw,
            ),
            timeout=60,
        )
        async for msg in call:
            msgs.append(msg)
        text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
        return msgs, text


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def stack(
    triton_url: str, tmp_path: Path, *, workers: int = 1, slots: int = 1, **cfg: Any
) -> AsyncIterator[Stack]:
    from services.worker.config import WorkerConfig
    from services.worker.server import WorkerServer
    from services.worker.triton_embedded import free_port

    config = SchedulerConfig(
        host="127.0.0.1",
        port=free_port(),
        heartbeat_interval_s=0.2,
        outcome_log=str(tmp_path / "outcomes.sqlite"),
        disconnect_grace_s=0.5,
        **cfg,
    )
    server = SchedulerServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    s = Stack(server, scheduler_pb2_grpc.SchedulerServiceStub(channel))
    try:
        for i in range(workers):
            w = WorkerServer(
                WorkerConfig(
                    triton=triton_url,
                    slots=slots,
                    scheduler=server.address,
                    worker_id=f"w{i}",
                    health_poll_s=0.5,
                ),
                triton_url,
            )
            await w.start()
            s.workers.append(w)
        await wait_for(lambda: len(server.servicer.workers) == workers)
        yield s
    finally:
        for w in s.workers:
            with contextlib.suppress(Exception):
                await w.stop(0.1)
        await channel.close(None)
        await server.stop(0.1)


async def test_generates_exactly_max_tokens_end_to_end(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        msgs, text = await s.generate("r1", 25)
        assert msgs[0].HasField("accepted")
        assert msgs[0].accepted.prediction_source == scheduler_pb2.PREDICTION_SOURCE_FALLBACK
        result = msgs[-1].result
        assert text == replay_text(1, 25)
        assert result.actual_tokens == 25
        assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert result.worker_id == "w0"
        assert 0 <= result.queue_wait_seconds <= result.time_to_first_token_seconds
        assert result.time_to_first_token_seconds <= result.completion_seconds
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.completed == 1 and stats.predictor_fallbacks == 1
        assert [w.worker_id for w in stats.workers] == ["w0"]
    # The outcome log has the row the predictor trains from.
    rows = sqlite3.connect(tmp_path / "outcomes.sqlite").execute(
        "SELECT request_id, model, length_model, actual_tokens, finish_reason FROM outcomes"
    )
    assert rows.fetchall() == [("r1", "replay", "Meta-Llama-3-8B-Instruct", 25, "length")]


async def test_short_jobs_queued_behind_a_busy_worker_finish_first_under_oracle_sjf(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(
        embedded_triton.grpc_url, tmp_path, policy="sjf-oracle", benchmark_mode=True
    ) as s:
        finished: list[str] = []

        async def run(rid: str, n: int) -> None:
            _, text = await s.generate(rid, n)
            assert text == replay_text(1, n)
            finished.append(rid)

        busy = asyncio.create_task(run("busy", 60))
        await wait_for(lambda: s.scheduler.servicer.core.running == 1)
        tasks = [asyncio.create_task(run(f"len{n}", n)) for n in (40, 30, 5, 20, 10)]
        await asyncio.gather(busy, *tasks)
        assert finished == ["busy", "len5", "len10", "len20", "len30", "len40"]


async def test_stats_report_the_aging_guard(embedded_triton: Any, tmp_path: Path) -> None:
    """Operators tune ssjf-aging's JCT target from what GetStats says its guard did."""
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("shortline_aging_late_jobs_total") or 0.0
    async with stack(
        embedded_triton.grpc_url, tmp_path, policy="ssjf-aging", jct_target_s=0.001
    ) as s:
        busy = asyncio.create_task(s.generate("busy", 40))
        await wait_for(lambda: s.scheduler.servicer.core.running == 1)
        # A target of 1 ms: both queued jobs reach their latest start while they wait.
        await asyncio.gather(busy, s.generate("a", 10), s.generate("b", 10))
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.completed == 3
        assert stats.late_jobs == 2
        # Learned from the three runs: seconds per token of the fallback prediction.
        assert stats.token_time_seconds > 0
        # Prometheus says the same.
        assert REGISTRY.get_sample_value("shortline_aging_late_jobs_total") == before + 2
        token_time = REGISTRY.get_sample_value("shortline_aging_token_time_seconds")
        assert token_time == pytest.approx(stats.token_time_seconds)


async def test_ssjf_orders_by_the_real_predictor(embedded_triton: Any, tmp_path: Path) -> None:
    from services.predictor.config import PredictorConfig
    from services.predictor.service import PredictorServer
    from services.worker.triton_embedded import free_port

    pcfg = PredictorConfig(port=free_port(), threads=1)
    predictor = PredictorServer(pcfg)
    await predictor.start()
    try:
        prompts = [
            "Write a long, detailed essay on the causes of the First World War.",
            "Say yes or no: is water wet?",
            "Give me a step-by-step guide to building a web app with a database.",
            "What is 2 + 2? Answer with a number only.",
        ]
        async with stack(
            embedded_triton.grpc_url, tmp_path, policy="ssjf", predictor=pcfg.address,
            predictor_timeout_ms=5000,
        ) as s:  # fmt: skip
            started: list[str] = []
            predicted: dict[str, float] = {}

            async def run(rid: str, prompt: str) -> None:
                # Long enough not to be capped by max_tokens; cancelled once it starts,
                # so that with one slot the order of starts is the queue's order.
                call = s.stub.Generate(
                    scheduler_pb2.GenerateRequest(
                        request_id=rid, model="replay", prompt=prompt, max_tokens=8000
                    ),
                    timeout=60,
                )
                async for msg in call:
                    if msg.HasField("accepted"):
                        assert msg.accepted.prediction_source in (
                            scheduler_pb2.PREDICTION_SOURCE_PREDICTOR,
                            scheduler_pb2.PREDICTION_SOURCE_CACHE,
                        )
                        predicted[rid] = msg.accepted.predicted_tokens
                    elif msg.HasField("delta") and rid not in started:
                        started.append(rid)
                        if rid != "busy":
                            await s.stub.Cancel(scheduler_pb2.CancelRequest(request_id=rid))

            busy = asyncio.create_task(run("busy", "Hello"))
            await wait_for(lambda: "busy" in started)
            tasks = [asyncio.create_task(run(f"p{i}", p)) for i, p in enumerate(prompts)]
            await wait_for(lambda: len(s.scheduler.servicer.core.queue) == len(prompts))
            await s.stub.Cancel(scheduler_pb2.CancelRequest(request_id="busy"))
            await asyncio.gather(busy, *tasks)
            order = started[1:]
            assert sorted(order) == [f"p{i}" for i in range(len(prompts))]
            assert len({predicted[r] for r in order}) == len(order)
            # Queued behind the busy worker, they started by prediction, smallest first.
            assert order == sorted(order, key=lambda r: predicted[r])
        # A replay benchmark divides the lengths by 10: the scheduler divides predictions
        # too, so remaining work (predicted - generated) stays in one unit.
        async with stack(
            embedded_triton.grpc_url, tmp_path, policy="ssjf", predictor=pcfg.address,
            predictor_timeout_ms=5000, benchmark_mode=True, prediction_scale=10.0,
        ) as s:  # fmt: skip
            msgs, _ = await s.generate("scaled", 5, prompt=prompts[0])
            assert msgs[0].accepted.prediction_source == scheduler_pb2.PREDICTION_SOURCE_PREDICTOR
            assert msgs[0].accepted.predicted_tokens == pytest.approx(
                predicted["p0"] / 10, rel=1e-3
            )
    finally:
        await predictor.stop(0.1)


async def test_cancel_stops_a_running_job_and_frees_its_slot(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        call = s.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="long", model="replay", prompt="go", max_tokens=2000
            )
        )
        msgs = []
        async for msg in call:
            msgs.append(msg)
            if msg.HasField("delta"):
                reply = await s.stub.Cancel(scheduler_pb2.CancelRequest(request_id="long"))
                assert reply.state == scheduler_pb2.REQUEST_STATE_CANCELLED
                break
        rest = [m async for m in call]
        assert rest[-1].result.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert rest[-1].result.actual_tokens < 2000
        # The slot frees once the worker stops: the next job runs.
        _, text = await s.generate("next", 5)
        assert text == replay_text(1, 5)
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.cancelled == 1 and stats.completed == 1 and stats.running == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Cancel(scheduler_pb2.CancelRequest(request_id="never-seen"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_full_queue_gives_resource_exhausted(embedded_triton: Any, tmp_path: Path) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path, queue_limit=1) as s:
        running = asyncio.create_task(s.generate("a", 100))
        await wait_for(lambda: s.scheduler.servicer.core.running == 1)
        waiting = asyncio.create_task(s.generate("b", 5))
        await wait_for(lambda: s.scheduler.servicer.core.queue_depth == 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.generate("c", 5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 1" in (err.value.details() or "")
        (_, a), (_, b) = await asyncio.gather(running, waiting)
        assert a == replay_text(1, 100) and b == replay_text(1, 5)


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 9000}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"model": ""}, "model"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
    ],
)
async def test_invalid_input_names_the_field(
    embedded_triton: Any, tmp_path: Path, change: dict[str, Any], field_name: str
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        request = scheduler_pb2.GenerateRequest(
            request_id="r", model="replay", prompt="go", max_tokens=5
        )
        for k, v in change.items():
            setattr(request, k, v)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in s.stub.Generate(request):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_name in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.generate("m", 5, model="no-such-model")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


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
                job = s.scheduler.servicer.core.get("survivor")
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
            lambda: (
                (s.scheduler.servicer.requests.get("long") is not None)
                and s.scheduler.servicer.requests["long"].tokens >= 10
            )
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
            lambda: (
                (s.scheduler.servicer.requests.get("same") is not None)
                and s.scheduler.servicer.requests["same"].tokens >= 5
            )
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
    from services.worker.server import WorkerServer

    url = embedded_triton.grpc_url
    async with stack(url, tmp_path, workers=0) as s:
        # Registered by hand and never heartbeating: alive for 3 x 0.2 s only.
        silent = WorkerServer(WorkerConfig(triton=url, slots=1, worker_id="silent"), url)
        await silent.start()
        try:
            await s.stub.RegisterWorker(
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
                await wait_for(lambda: "silent" not in s.scheduler.servicer.workers)
                healthy = WorkerServer(
                    WorkerConfig(
                        triton=url, slots=1, scheduler=s.scheduler.address, worker_id="ok"
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
        core = s.scheduler.servicer.core
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
        core = s.scheduler.servicer.core
        await wait_for(lambda: core.cancelled == 1 and core.running == 0, timeout=10)
        assert s.scheduler.servicer.requests["late"].job.finish_reason == "deadline"


async def test_an_unreachable_predictor_falls_back_and_is_counted(
    embedded_triton: Any, tmp_path: Path
) -> None:
    from services.worker.triton_embedded import free_port

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
