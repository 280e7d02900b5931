"""A worker serves what its Triton serves (``--models auto``), or an explicit list.

Real parts: the session's embedded Triton (smollm2-135m-instruct and replay), a
replay-only embedded Triton started late, and a minimal scheduler that records
registrations (the worker's side is under test here; the scheduler's checks of
head targets are in tests/scheduler/test_length_model_mapping.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.worker.config import DEFAULT_HEAD, REPLAY, SMOLLM2, WorkerConfig
from services.worker.service.server import WorkerServer, WorkerStartError
from shortline.common.net import free_port
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2


class Recorder(internal_pb2_grpc.SchedulerInternalServiceServicer):
    def __init__(self) -> None:
        self.registrations: list[scheduler_pb2.RegisterWorkerRequest] = []

    async def RegisterWorker(self, request: Any, context: Any) -> Any:
        self.registrations.append(request)
        return scheduler_pb2.RegisterWorkerResponse(heartbeat_interval_seconds=0.1)

    async def Heartbeat(self, request: Any, context: Any) -> Any:
        return scheduler_pb2.HeartbeatResponse(known=True)

    async def GetStats(self, request: Any, context: Any) -> Any:
        return scheduler_pb2.GetStatsResponse()


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    servicer = Recorder()
    server = grpc.aio.server()
    internal_pb2_grpc.add_SchedulerInternalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0.1)


async def _until(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def _limits(reg: scheduler_pb2.RegisterWorkerRequest) -> dict[str, tuple[int, int, str]]:
    return {m.model: (m.max_tokens, m.max_prompt_chars, m.length_model) for m in reg.limits}


async def test_auto_registers_exactly_the_models_triton_serves(
    embedded_triton: Any, recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    config = WorkerConfig(slots=2, scheduler=address, max_prompt_chars=5000)
    assert config.auto  # the default
    worker = WorkerServer(config, embedded_triton.grpc_url)
    await worker.start()
    try:
        await _until(lambda: bool(servicer.registrations))
        reg = servicer.registrations[0]
        assert list(reg.models) == sorted([REPLAY, SMOLLM2])
        assert _limits(reg) == {
            REPLAY: (65536, 5000, DEFAULT_HEAD),
            SMOLLM2: (4096, 5000, DEFAULT_HEAD),
        }
        assert set(worker.servicer.models) == {REPLAY, SMOLLM2}
    finally:
        await worker.stop(0.1)


async def test_explicit_list_is_used_as_given(
    embedded_triton: Any, recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    config = WorkerConfig(
        slots=1, scheduler=address, models="replay=raw:100", length_models="replay=claude-2.1"
    )
    worker = WorkerServer(config, embedded_triton.grpc_url)
    await worker.start()
    try:
        await _until(lambda: bool(servicer.registrations))
        reg = servicer.registrations[0]
        assert list(reg.models) == [REPLAY]  # Triton serves smollm2 too: not asked
        assert _limits(reg)[REPLAY][0] == 100 and _limits(reg)[REPLAY][2] == "claude-2.1"
    finally:
        await worker.stop(0.1)


async def test_served_model_without_settings_stops_the_start(embedded_triton: Any) -> None:
    port = free_port()
    config = WorkerConfig(slots=1, port=port, model_settings="replay=raw:100")
    worker = WorkerServer(config, embedded_triton.grpc_url)
    with pytest.raises(WorkerStartError) as err:
        await worker.start()
    message = str(err.value)
    assert SMOLLM2 in message and "--model-settings" in message
    assert REPLAY not in message.split("serves")[1].split("but")[0]
    # Stopped: its port is closed again.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_triton_up_late_with_other_models_is_followed(
    recorder: tuple[Recorder, str],
) -> None:
    """Until Triton answers, the models of --model-settings are announced (and not
    served); once it does, the worker registers again with exactly what it serves."""
    from services.worker.config import TritonServeConfig
    from services.worker.triton.embedded import EmbeddedTriton

    servicer, address = recorder
    grpc_port = free_port()
    config = WorkerConfig(slots=1, scheduler=address, health_poll_s=0.2)
    worker = WorkerServer(config, f"127.0.0.1:{grpc_port}")
    await worker.start()
    triton = EmbeddedTriton(TritonServeConfig(models=REPLAY, grpc_port=grpc_port))
    try:
        await _until(lambda: bool(servicer.registrations))
        assert sorted(servicer.registrations[0].models) == sorted([REPLAY, SMOLLM2])
        await asyncio.to_thread(triton.start)
        await _until(lambda: list(servicer.registrations[-1].models) == [REPLAY])
        await _until(lambda: worker.servicer.serving)
        assert set(worker.servicer.models) == {REPLAY}
        count = len(servicer.registrations)
        await asyncio.sleep(0.6)  # several readiness polls: no registration without a change
        assert len(servicer.registrations) == count
    finally:
        await worker.stop(0.1)
        await asyncio.to_thread(triton.stop, 0.0)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"length_models": "replay"}, "--length-models: expected SERVED=TARGET"),
        ({"length_models": "replay=a,replay=b"}, "replay is mapped twice"),
        ({"model_settings": "x=nope:1"}, "--model-settings: model x: prompt format"),
        ({"models": "x=raw:zero"}, "--models: model x: max tokens"),
    ],
)
def test_bad_model_flags_name_the_flag(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as err:
        WorkerConfig(**kw)
    assert needle in str(err.value)
