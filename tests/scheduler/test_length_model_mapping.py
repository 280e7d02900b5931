"""The head a request is predicted with when it names none comes from its served
model (the workers' ``--length-models``), and a target with no predictor head is
refused at registration: FAILED_PRECONDITION, and the worker does not start.

Real parts: the shipped predictor (its heads are the scheduler's list), a scheduler
with an outcome log, workers on the session's embedded Triton, and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from services.worker.config import WorkerConfig
from services.worker.service.server import WorkerServer, WorkerStartError
from shortline.common.net import free_port
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from tests.scheduler.live_stack import replay_request, wait_for

MISTRAL = "Mistral-7B-Instruct-v0.2"


@dataclass
class Pool:
    scheduler: SchedulerServer
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    internal: internal_pb2_grpc.SchedulerInternalServiceAsyncStub
    outcomes: Path


@contextlib.asynccontextmanager
async def _pool(triton_url: str, tmp_path: Path) -> AsyncIterator[Pool]:
    """A scheduler with the shipped predictor and one worker mapping replay to Mistral."""
    from services.predictor.config import PredictorConfig
    from services.predictor.service import PredictorServer

    predictor = PredictorServer(PredictorConfig(port=free_port(), threads=1))
    await predictor.start()
    outcomes = tmp_path / "outcomes.sqlite"
    cfg = SchedulerConfig(
        port=free_port(),
        internal_port=0,
        heartbeat_interval_s=0.2,
        predictor=predictor.cfg.address,
        outcome_log=str(outcomes),
    )
    scheduler = SchedulerServer(cfg)
    await scheduler.start()
    worker = WorkerServer(
        WorkerConfig(
            slots=2,
            scheduler=scheduler.internal_address,
            worker_id="w-mistral",
            models="replay=raw:1000",
            length_models=f"replay={MISTRAL}",
            health_poll_s=0.5,
        ),
        triton_url,
    )
    try:
        await worker.start()
        async with (
            grpc.aio.insecure_channel(scheduler.address) as public,
            grpc.aio.insecure_channel(scheduler.internal_address) as internal,
        ):
            await wait_for(lambda: len(scheduler.plane.workers) == 1)
            yield Pool(
                scheduler,
                scheduler_pb2_grpc.SchedulerServiceStub(public),
                internal_pb2_grpc.SchedulerInternalServiceStub(internal),
                outcomes,
            )
    finally:
        await worker.stop(0.1)
        await scheduler.stop(0.1)
        await predictor.stop(0.1)


def _logged_length_model(path: Path, request_id: str) -> str | None:
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute(
            "SELECT length_model FROM outcomes WHERE request_id = ?", (request_id,)
        ).fetchone()
    return None if row is None else str(row[0])


async def _finish(stub: Any, request_id: str, **fields: Any) -> None:
    async for msg in stub.Generate(replay_request(request_id, 3, **fields), timeout=60):
        if msg.HasField("result"):
            return
    raise AssertionError(f"{request_id} ended without a result")


def _registration(worker_id: str, length_model: str = "") -> Any:
    limits = [scheduler_pb2.ModelLimits(model="replay", length_model=length_model)]
    return scheduler_pb2.RegisterWorkerRequest(
        worker_id=worker_id,
        address=f"127.0.0.1:{free_port()}",
        slots=1,
        models=["replay"],
        limits=limits if length_model else [],
    )


async def test_served_models_head_is_used_and_an_unknown_head_is_refused(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with _pool(embedded_triton.grpc_url, tmp_path) as p:
        # A request without length_model: the served model's head, not the default.
        await _finish(p.stub, "no-head")
        await _finish(p.stub, "own-head", length_model="claude-2.1")
        await wait_for(lambda: _logged_length_model(p.outcomes, "own-head") is not None)
        assert _logged_length_model(p.outcomes, "no-head") == MISTRAL
        assert _logged_length_model(p.outcomes, "own-head") == "claude-2.1"
        listed = await p.stub.ListModels(scheduler_pb2.ListModelsRequest())
        assert [(m.model, m.length_model) for m in listed.models] == [("replay", MISTRAL)]

        # A head the predictor does not have: refused, naming model, target and flag.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.internal.RegisterWorker(_registration("w-bad", "no-such-head"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.value.details() or ""
        for needle in ("'replay'", "'no-such-head'", "--length-models", MISTRAL):
            assert needle in details
        # Another head for the same model in this pool: refused too.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.internal.RegisterWorker(_registration("w-other", "claude-2.1"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "w-mistral" in (err.value.details() or "")
        assert "w-bad" not in p.scheduler.plane.workers
        assert "w-other" not in p.scheduler.plane.workers

        # The worker with the unknown head does not start, and says why.
        bad = WorkerServer(
            WorkerConfig(
                slots=1,
                scheduler=p.scheduler.internal_address,
                worker_id="w-bad-worker",
                models="replay=raw:1000",
                length_models="replay=no-such-head",
            ),
            embedded_triton.grpc_url,
        )
        with pytest.raises(WorkerStartError) as start:
            await bad.start()
        assert "'no-such-head'" in str(start.value) and "--length-models" in str(start.value)

        # The same from the command line: the process exits with the message.
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "shortline.cli", "worker", "serve"),
            *("--triton", embedded_triton.grpc_url, "--models", "replay=raw:1000"),
            *("--scheduler", p.scheduler.internal_address),
            *("--length-models", "replay=no-such-head"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0
        text = stderr.decode()
        assert "worker cannot start" in text
        assert "'no-such-head'" in text and "--length-models" in text

        # An old worker (no length_model: the scheduler's default) still joins.
        await p.internal.RegisterWorker(_registration("w-old"))
        assert "w-old" in p.scheduler.plane.workers
