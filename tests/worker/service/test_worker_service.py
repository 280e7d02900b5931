"""The WorkerService through real gRPC against the session's embedded Triton."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.worker.config import WorkerConfig
from services.worker.metrics import REGISTRY
from services.worker.service.server import WorkerServer
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

SLOTS = 3


@pytest.fixture(scope="session")
async def worker(embedded_triton: Any) -> AsyncIterator[WorkerServer]:
    # One message per token (coalescing off): these tests look at each token's decoding
    # step; the coalesced stream (the default) has tests of its own below.
    server = WorkerServer(
        WorkerConfig(slots=SLOTS, health_poll_s=0.5, worker_id="w-test", coalesce_ms=0.0),
        embedded_triton.grpc_url,
    )
    await server.start()
    yield server
    await server.stop(0.5)


@pytest.fixture(scope="session")
async def stub(worker: WorkerServer) -> AsyncIterator[worker_pb2_grpc.WorkerServiceStub]:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def _req(job: str, model: str = "replay", max_tokens: int = 5, **kw: Any) -> Any:
    sampling = kw.pop("sampling", common_pb2.SamplingParams(ignore_eos=True))
    kw.setdefault("job_id", job)
    return worker_pb2.ExecuteRequest(
        model=model, prompt="hi", max_tokens=max_tokens, sampling=sampling, **kw
    )


async def _collect(call: Any) -> tuple[list[Any], Any]:
    deltas, result = [], None
    async for msg in call:
        if msg.HasField("delta"):
            deltas.append(msg.delta)
        else:
            result = msg.result
    return deltas, result


async def _slots_used(stub: Any) -> int:
    for _ in range(50):
        cap = await stub.GetCapacity(worker_pb2.GetCapacityRequest())
        if cap.slots_used == 0:
            return 0
        await asyncio.sleep(0.05)
    return int(cap.slots_used)


async def test_smollm2_streams_a_real_answer(stub: Any) -> None:
    sampling = common_pb2.SamplingParams(temperature=0.0)
    call = stub.Execute(
        worker_pb2.ExecuteRequest(
            job_id="s1",
            model="smollm2-135m-instruct",
            prompt="What is the capital of France? Answer in one word.",
            max_tokens=16,
            sampling=sampling,
        )
    )
    deltas, result = await _collect(call)
    text = "".join(d.text for d in deltas)
    assert "Paris" in text
    assert len(deltas) >= 2
    assert result.tokens == sum(d.tokens for d in deltas) == deltas[-1].total_tokens
    assert result.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert result.worker_id == "w-test"
    assert 0 < result.first_token_seconds <= result.total_seconds


def _tokens_metric() -> float:
    labels = {"worker": "w-test", "model": "replay"}
    return REGISTRY.get_sample_value("shortline_worker_tokens_total", labels) or 0.0


async def test_replay_streams_exactly_n_tokens(stub: Any) -> None:
    before = _tokens_metric()
    deltas, result = await _collect(stub.Execute(_req("r1", max_tokens=37)))
    assert _tokens_metric() - before == 37
    assert result.tokens == 37 == sum(d.tokens for d in deltas)
    assert "".join(d.text for d in deltas) == "".join(f" replay{i}" for i in range(1, 38))
    assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_resume_text_continues_the_replayed_numbering(stub: Any) -> None:
    deltas, _ = await _collect(stub.Execute(_req("r2", max_tokens=2, resume_text=" replay1")))
    assert "".join(d.text for d in deltas) == " replay2 replay3"


async def test_concurrent_requests_share_decoding_steps(stub: Any) -> None:
    calls = [_collect(stub.Execute(_req(f"c{i}", max_tokens=20))) for i in range(SLOTS)]
    outs = await asyncio.gather(*calls)
    step_sets = [{d.step for d in deltas} for deltas, _ in outs]
    shared = set.intersection(*step_sets)
    assert len(shared) >= 15  # they ran in the same steps of one loop
    assert max(d.batch_size for deltas, _ in outs for d in deltas) == SLOTS


async def test_cancel_mid_stream_returns_streamed_text_and_frees_the_slot(stub: Any) -> None:
    call = stub.Execute(_req("x1", max_tokens=5000))
    seen: list[Any] = []
    result = None
    async for msg in call:
        if msg.HasField("delta"):
            seen.append(msg.delta)
            if len(seen) == 5:
                stop = await stub.Cancel(worker_pb2.CancelRequest(job_id="x1"))
        else:
            result = msg.result
    streamed = "".join(d.text for d in seen)
    assert stop.text == streamed and stop.tokens == len(seen)
    assert result is not None and result.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert result.tokens == stop.tokens
    assert await _slots_used(stub) == 0
    # The model dropped the sequence: a new job decodes alone.
    after, _ = await _collect(stub.Execute(_req("x2", max_tokens=3)))
    assert after[1].batch_size == 1


async def test_preempt_returns_exact_prefix_and_resume_completes_it(stub: Any) -> None:
    call = stub.Execute(_req("p1", max_tokens=40))
    seen: list[Any] = []
    preempted = None
    async for msg in call:
        if msg.HasField("delta"):
            seen.append(msg.delta)
            if len(seen) == 7:
                # Race the stream on purpose: deltas already in flight still count.
                await asyncio.sleep(0.03)
                preempted = await stub.Preempt(worker_pb2.PreemptRequest(job_id="p1"))
        else:
            assert msg.result.finish_reason == common_pb2.FINISH_REASON_PREEMPTED
    assert preempted is not None
    assert preempted.text == "".join(d.text for d in seen)
    assert preempted.tokens == sum(d.tokens for d in seen) >= 7
    rest, result = await _collect(
        stub.Execute(
            _req(
                "p1",
                max_tokens=40 - preempted.tokens,
                resume_text=preempted.text,
                resume_tokens=preempted.tokens,
            )
        )
    )
    full = preempted.text + "".join(d.text for d in rest)
    assert result.tokens == 40 - preempted.tokens
    assert full == "".join(f" replay{i}" for i in range(1, 41))  # no gap, no repeat


async def test_full_slots_give_resource_exhausted(stub: Any) -> None:
    calls = [stub.Execute(_req(f"f{i}", max_tokens=2000)) for i in range(SLOTS)]
    for c in calls:  # wait until each is running
        await c.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub.Execute(_req("f-extra")))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for c in calls:
        c.cancel()  # client goes away: the slots must come back
    assert await _slots_used(stub) == 0


async def test_deadline_frees_the_slot(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub.Execute(_req("d1", max_tokens=5000), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _slots_used(stub) == 0


@pytest.mark.parametrize(
    ("request_kw", "code", "needle"),
    [
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"max_tokens": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (
            {"sampling": common_pb2.SamplingParams(temperature=-1.0)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"sampling": common_pb2.SamplingParams(top_p=1.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
        ({"model": "gpt-17"}, grpc.StatusCode.NOT_FOUND, "gpt-17"),
        ({"resume_text": "x" * 70000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"job_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
    ],
)
async def test_bad_requests_get_the_right_status(
    stub: Any, request_kw: dict[str, Any], code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(stub.Execute(_req("bad", **request_kw)))
    assert err.value.code() == code
    assert needle in (err.value.details() or "")


async def test_cancel_of_unknown_job_is_not_found(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Cancel(worker_pb2.CancelRequest(job_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_worker_without_triton_is_unavailable_and_not_serving() -> None:
    dead = f"127.0.0.1:{free_port()}"
    server = WorkerServer(WorkerConfig(slots=1, health_poll_s=0.2), dead)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _collect(stub.Execute(_req("u1")))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dead in (err.value.details() or "")
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            cap = await stub.GetCapacity(worker_pb2.GetCapacityRequest())
            assert not cap.serving and cap.triton_url == dead
    finally:
        await server.stop(0.2)


async def test_healthy_worker_reports_serving(worker: WorkerServer) -> None:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="shortline.worker.v1.WorkerService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_model_configured_here_but_missing_on_triton_is_not_found(
    embedded_triton: Any,
) -> None:
    config = WorkerConfig(slots=1, models="ghost=raw:10")
    server = WorkerServer(config, embedded_triton.grpc_url)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _collect(stub.Execute(_req("g1", model="ghost")))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "ghost" in (err.value.details() or "")
            assert await _slots_used(stub) == 0
    finally:
        await server.stop(0.2)


async def test_triton_dying_mid_stream_gives_unavailable_and_not_serving() -> None:
    from services.worker.config import TritonServeConfig
    from services.worker.triton.embedded import EmbeddedTriton

    triton = EmbeddedTriton(TritonServeConfig(models="replay"))
    await asyncio.to_thread(triton.start)
    server = WorkerServer(WorkerConfig(slots=2, health_poll_s=0.2), triton.grpc_url)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            call = stub.Execute(_req("k1", max_tokens=5000))
            await call.read()
            await asyncio.to_thread(triton.stop, 0.0)  # SIGINT then SIGKILL of its group
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while True:
                    await call.read()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert triton.grpc_url in (err.value.details() or "")
            assert await _slots_used(stub) == 0
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(50):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0.2)
        triton.stop()


async def test_smollm2_batch_survives_joins_leaves_and_a_cancel(stub: Any) -> None:
    """Sequences of different lengths join and leave the shared KV cache mid-flight."""
    sampling = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)

    def req(job_id: str, prompt: str, n: int) -> Any:
        return worker_pb2.ExecuteRequest(
            job_id=job_id,
            model="smollm2-135m-instruct",
            prompt=prompt,
            max_tokens=n,
            sampling=sampling,
        )

    async def late(job_id: str, prompt: str, n: int, delay: float) -> tuple[list[Any], Any]:
        await asyncio.sleep(delay)
        return await _collect(stub.Execute(req(job_id, prompt, n)))

    async def cancelled() -> int:
        call = stub.Execute(req("m-x", "Tell me a very long story about dragons.", 500))
        got = 0
        async for msg in call:
            if msg.HasField("delta"):
                got += 1
                if got == 4:
                    await stub.Cancel(worker_pb2.CancelRequest(job_id="m-x"))
        return got

    async def a_then_c() -> list[tuple[list[Any], Any]]:
        first = await late("m-a", "Name a color.", 6, 0.0)
        return [first, await late("m-c", "Hi", 9, 0.0)]  # joins after m-a left

    (a, c), b, x = await asyncio.gather(
        a_then_c(),
        late("m-b", "Write two sentences about the moon and the stars at night.", 14, 0.1),
        cancelled(),
    )
    for (deltas, result), n in ((a, 6), (b, 14), (c, 9)):
        assert result.tokens == n == sum(d.tokens for d in deltas)
        assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert x >= 4
    assert max(d.batch_size for deltas, _ in (a, b, c) for d in deltas) >= 2
    assert await _slots_used(stub) == 0


async def test_cancel_right_after_start_is_consistent(stub: Any) -> None:
    call = stub.Execute(_req("early", max_tokens=5000))
    for _ in range(200):
        if (await stub.GetCapacity(worker_pb2.GetCapacityRequest())).slots_used:
            break
        await asyncio.sleep(0.005)
    stop = await stub.Cancel(worker_pb2.CancelRequest(job_id="early"))
    deltas, result = await _collect(call)
    assert stop.text == "".join(d.text for d in deltas)
    assert stop.tokens == result.tokens == len(deltas) <= 3
    assert result.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert await _slots_used(stub) == 0


@pytest.fixture(scope="module")
async def coalescing(embedded_triton: Any) -> AsyncIterator[worker_pb2_grpc.WorkerServiceStub]:
    """A coalescing worker. Its interval is longer than the default 20 ms: the test
    session's replay model takes 10-13 ms a token, so 20 ms would merge only two."""
    server = WorkerServer(
        WorkerConfig(slots=SLOTS, health_poll_s=0.5, worker_id="w-coalesce", coalesce_ms=60.0),
        embedded_triton.grpc_url,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield worker_pb2_grpc.WorkerServiceStub(channel)
    finally:
        await server.stop(0.5)


async def test_coalesced_streams_carry_the_same_text_in_fewer_messages(coalescing: Any) -> None:
    calls = [_collect(coalescing.Execute(_req(f"k{i}", max_tokens=120))) for i in range(SLOTS)]
    for deltas, result in await asyncio.gather(*calls):
        assert "".join(d.text for d in deltas) == "".join(f" replay{i}" for i in range(1, 121))
        assert sum(d.tokens for d in deltas) == 120 == result.tokens
        assert deltas[0].tokens == 1  # the first token alone: time to first token unchanged
        assert deltas[-1].total_tokens == 120
        assert len(deltas) < 50  # 120, one message per token, without coalescing


async def test_a_coalesced_stream_stops_with_exactly_what_it_sent(coalescing: Any) -> None:
    for rpc, reason in (
        (coalescing.Cancel, common_pb2.FINISH_REASON_CANCELLED),
        (coalescing.Preempt, common_pb2.FINISH_REASON_PREEMPTED),
    ):
        job = f"s{reason}"
        call = coalescing.Execute(_req(job, max_tokens=3000))
        seen: list[Any] = []
        stop = result = None
        async for msg in call:
            if msg.HasField("delta"):
                seen.append(msg.delta)
                if len(seen) == 3:
                    request = (
                        worker_pb2.CancelRequest(job_id=job)
                        if rpc is coalescing.Cancel
                        else worker_pb2.PreemptRequest(job_id=job)
                    )
                    stop = await rpc(request)
            else:
                result = msg.result
        assert stop is not None and result is not None
        assert result.finish_reason == reason
        assert stop.text == "".join(d.text for d in seen)
        assert stop.tokens == sum(d.tokens for d in seen) == result.tokens
        assert stop.text == "".join(f" replay{i}" for i in range(1, stop.tokens + 1))
