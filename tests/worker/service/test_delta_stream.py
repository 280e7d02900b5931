"""StreamDeltas through real gRPC against the session's embedded Triton: several jobs'
deltas on one stream, each job's in order and exact, Execute left with the result
(which counts them); a stop's exact prefix; Execute's deltas when the stream named
is not open; the stream ending after what waits on it."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.worker.config import WorkerConfig
from services.worker.service.server import WorkerServer
from shortline.common.v1 import common_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

SLOTS = 3


def replay_text(first: int, last: int) -> str:
    return "".join(f" replay{i}" for i in range(first, last + 1))


@pytest.fixture(scope="module")
async def served(embedded_triton: Any) -> AsyncIterator[tuple[WorkerServer, Any]]:
    # One delta per token (coalescing off): many deltas, several jobs' at each step.
    server = WorkerServer(
        WorkerConfig(slots=SLOTS, health_poll_s=0.5, worker_id="w-deltas", coalesce_ms=0.0),
        embedded_triton.grpc_url,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, worker_pb2_grpc.WorkerServiceStub(channel)
    finally:
        await server.stop(0.5)


def _req(job: str, stream: str, max_tokens: int) -> worker_pb2.ExecuteRequest:
    return worker_pb2.ExecuteRequest(
        job_id=job,
        model="replay",
        prompt="hi",
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
        delta_stream=stream,
    )


class Reader:
    """Reads one StreamDeltas stream in the background: each job's deltas, and how many
    jobs each message carried."""

    def __init__(self, stub: Any, stream_id: str) -> None:
        self.call = stub.StreamDeltas(worker_pb2.StreamDeltasRequest(stream_id=stream_id))
        self.deltas: dict[str, list[Any]] = defaultdict(list)
        self.jobs_per_message: list[int] = []
        self.ended = False
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> Reader:
        first = await self.call.read()
        assert list(first.deltas) == []  # the empty first message: open
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            self.jobs_per_message.append(len({d.job_id for d in message.deltas}))
            for item in message.deltas:
                self.deltas[item.job_id].append(item.delta)
        self.ended = True

    async def until(self, job: str, count: int) -> list[Any]:
        for _ in range(500):
            if len(self.deltas[job]) >= count:
                return self.deltas[job]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{job}: {len(self.deltas[job])} of {count} deltas")

    def close(self) -> None:
        self.call.cancel()


async def _execute(call: Any) -> tuple[list[Any], Any]:
    deltas, result = [], None
    async for msg in call:
        if msg.HasField("delta"):
            deltas.append(msg.delta)
        else:
            result = msg.result
    return deltas, result


async def test_jobs_deltas_come_in_order_on_one_stream(served: Any) -> None:
    _, stub = served
    reader = await Reader(stub, "s-order").open()
    try:
        calls = [_execute(stub.Execute(_req(f"o{i}", "s-order", 40 + i))) for i in range(SLOTS)]
        for i, (on_execute, result) in enumerate(await asyncio.gather(*calls)):
            assert on_execute == []  # Execute carried the result alone
            deltas = await reader.until(f"o{i}", result.streamed_deltas)
            assert len(deltas) == result.streamed_deltas == 40 + i
            assert "".join(d.text for d in deltas) == replay_text(1, 40 + i)
            assert [d.total_tokens for d in deltas] == list(range(1, 41 + i))
            assert result.tokens == 40 + i
        # The jobs step together: a message carries several jobs' deltas.
        assert max(reader.jobs_per_message) > 1
    finally:
        reader.close()


async def test_a_stop_returns_exactly_what_the_stream_carried(served: Any) -> None:
    _, stub = served
    reader = await Reader(stub, "s-stop").open()
    try:
        for rpc, reason in (
            (stub.Cancel, common_pb2.FINISH_REASON_CANCELLED),
            (stub.Preempt, common_pb2.FINISH_REASON_PREEMPTED),
        ):
            job = f"stop{reason}"
            execute = asyncio.create_task(_execute(stub.Execute(_req(job, "s-stop", 3000))))
            await reader.until(job, 3)
            stop_request = (
                worker_pb2.CancelRequest(job_id=job)
                if rpc is stub.Cancel
                else worker_pb2.PreemptRequest(job_id=job)
            )
            stop = await rpc(stop_request)
            on_execute, result = await execute
            deltas = await reader.until(job, result.streamed_deltas)
            assert on_execute == [] and result.finish_reason == reason
            assert len(deltas) == result.streamed_deltas
            assert stop.text == "".join(d.text for d in deltas) == replay_text(1, stop.tokens)
            assert stop.tokens == sum(d.tokens for d in deltas) == result.tokens
    finally:
        reader.close()


async def test_a_stream_not_open_leaves_the_deltas_on_execute(served: Any) -> None:
    _, stub = served
    deltas, result = await _execute(stub.Execute(_req("fallback", "not-open", 12)))
    assert "".join(d.text for d in deltas) == replay_text(1, 12)
    assert result.streamed_deltas == 0 and result.tokens == 12


async def test_close_all_ends_the_stream_after_what_waits(served: Any) -> None:
    server, stub = served
    reader = await Reader(stub, "s-close").open()
    deltas = server.servicer.deltas
    assert deltas.put("s-close", "j", worker_pb2.TextDelta(text=" x", tokens=1))
    deltas.close_all()
    assert not deltas.put("s-close", "j", worker_pb2.TextDelta(text=" y", tokens=1))
    assert reader.task is not None
    await asyncio.wait_for(reader.task, 5)
    assert reader.ended and [d.text for d in reader.deltas["j"]] == [" x"]
    assert not deltas.has("s-close")
