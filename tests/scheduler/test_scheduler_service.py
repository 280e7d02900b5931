"""The scheduler service over real gRPC: generation, ordering, cancel, admission and
validation, with real workers on an embedded Triton (``live_stack.py``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import replay_text, stack, wait_for

from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

pytestmark = pytest.mark.slow


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
        await wait_for(lambda: s.scheduler.plane.core.running == 1)
        tasks = [asyncio.create_task(run(f"len{n}", n)) for n in (40, 30, 5, 20, 10)]
        await asyncio.gather(busy, *tasks)
        assert finished == ["busy", "len5", "len10", "len20", "len30", "len40"]


async def test_stats_report_the_aging_guard(embedded_triton: Any, tmp_path: Path) -> None:
    """Operators tune ssjf-aging's JCT target from what GetStats says its guard did."""
    from services.scheduler.metrics import REGISTRY

    before = REGISTRY.get_sample_value("shortline_aging_late_jobs_total") or 0.0
    async with stack(
        embedded_triton.grpc_url, tmp_path, policy="ssjf-aging", jct_target_s=0.001
    ) as s:
        busy = asyncio.create_task(s.generate("busy", 40))
        await wait_for(lambda: s.scheduler.plane.core.running == 1)
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
    from shortline.common.net import free_port

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
            await wait_for(lambda: len(s.scheduler.plane.core.queue) == len(prompts))
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
        await wait_for(lambda: s.scheduler.plane.core.running == 1)
        waiting = asyncio.create_task(s.generate("b", 5))
        await wait_for(lambda: s.scheduler.plane.core.queue_depth == 1)
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
