"""The scheduler's end of the workers' StreamDeltas streams, on a live stack: runs'
deltas come on it and every text is exact; a stream that breaks mid-run leaves its
jobs to resume with no gap or repeat; a worker without the RPC (as v0.1.0's) serves
on Execute alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import replay_text, stack, wait_for

from services.scheduler.service import delta_stream
from services.worker.service.deltas import DeltaStreams
from services.worker.service.servicer import WorkerServicer
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2
from shortline.worker.v1 import worker_pb2

pytestmark = pytest.mark.slow


def _handles(s: Any) -> list[Any]:
    return list(s.scheduler.plane.workers)


def count_deliveries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the deltas that came on a delta stream (``RunSink.deliver``)."""
    seen = [0]
    deliver = delta_stream.RunSink.deliver

    def counted(self: delta_stream.RunSink, delta: worker_pb2.TextDelta) -> None:
        seen[0] += 1
        deliver(self, delta)

    monkeypatch.setattr(delta_stream.RunSink, "deliver", counted)
    return seen


async def test_runs_deltas_come_on_the_stream_exact(
    embedded_triton: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = count_deliveries(monkeypatch)
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=4) as s:
        await wait_for(lambda: all(h.deltas.ready for h in _handles(s)))
        runs = [s.generate(f"mux{i}", 30 + 7 * i) for i in range(4)]
        for i, (msgs, text) in enumerate(await asyncio.gather(*runs)):
            assert text == replay_text(1, 30 + 7 * i)
            result = msgs[-1].result
            assert result.actual_tokens == 30 + 7 * i
            assert sum(m.delta.tokens for m in msgs if m.HasField("delta")) == 30 + 7 * i
    assert seen[0] > 0


async def test_a_stream_broken_mid_run_resumes_its_job_exactly(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=2) as s:
        await wait_for(lambda: all(h.deltas.ready for h in _handles(s)))
        call = s.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="broken",
                model="replay",
                prompt="go",
                max_tokens=150,
                sampling=common_pb2.SamplingParams(ignore_eos=True),
            ),
            timeout=60,
        )
        msgs: list[Any] = []
        broke = False
        async for msg in call:
            msgs.append(msg)
            tokens = sum(m.delta.tokens for m in msgs if m.HasField("delta"))
            if not broke and tokens >= 20:
                broke = True
                s.workers[0].servicer.deltas.close_all()  # the stream ends, the job runs on
        text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
        assert broke
        assert text == replay_text(1, 150)  # no gap, no repeat across the break
        assert msgs[-1].result.actual_tokens == 150
        # It broke with the stream and resumed (a requeue), not ran on unharmed.
        done = [r for r in s.scheduler.plane.results.store._done.values() if r.id == "broken"]
        assert done and done[0].job.requeues >= 1 and done[0].tokens == 150
        # The stream is opened again (a new id) for later runs.
        await wait_for(lambda: all(h.deltas.ready for h in _handles(s)), timeout=10)


async def test_a_worker_without_the_rpc_serves_on_execute(
    embedded_triton: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unimplemented(
        self: WorkerServicer, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        yield  # an async generator, as the RPC's handler must be

    monkeypatch.setattr(WorkerServicer, "StreamDeltas", unimplemented)
    seen = count_deliveries(monkeypatch)
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=2) as s:
        await wait_for(lambda: not any(h.deltas.supported for h in _handles(s)))
        msgs, text = await s.generate("old-worker", 40)
        assert text == replay_text(1, 40)
        assert msgs[-1].result.actual_tokens == 40
    assert seen[0] == 0


async def test_a_result_waits_for_the_deltas_still_on_their_way(
    embedded_triton: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result travels on Execute, the deltas on the other stream: held back (a long
    gathering, no flush at the end), the last ones arrive after the result, and the run
    still ends with all of them (ExecuteResult.streamed_deltas)."""
    monkeypatch.setattr(DeltaStreams, "flush", lambda self, stream_id: None)
    async with stack(embedded_triton.grpc_url, tmp_path, workers=1, slots=2) as s:
        s.workers[0].servicer.deltas.gather_s = 0.4
        await wait_for(lambda: all(h.deltas.ready for h in _handles(s)))
        msgs, text = await s.generate("late-deltas", 25)
        assert text == replay_text(1, 25)
        assert msgs[-1].result.actual_tokens == 25
