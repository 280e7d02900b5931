"""The client SDK against a real scheduler and worker (embedded Triton, replay)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import grpc
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from services.worker.config import WorkerConfig
from services.worker.service.server import WorkerServer
from shortline.client import AsyncShortlineClient, ClientOptions, ShortlineClient
from shortline.common.net import free_port

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def scheduler_with_worker(triton_url: str, port: int) -> Any:
    scheduler = SchedulerServer(
        SchedulerConfig(host="127.0.0.1", port=port, internal_port=0, heartbeat_interval_s=0.2)
    )
    await scheduler.start()
    worker = WorkerServer(
        WorkerConfig(
            triton=triton_url,
            slots=2,
            scheduler=scheduler.internal_address,
            worker_id="sdk",
            health_poll_s=0.5,
        ),
        triton_url,
    )
    await worker.start()
    try:
        while not scheduler.plane.workers:
            await asyncio.sleep(0.02)
        yield scheduler
    finally:
        await worker.stop(0.1)
        await scheduler.stop(0.1)


async def test_async_client_retries_unavailable_until_the_scheduler_is_up(
    embedded_triton: Any,
) -> None:
    port = free_port()
    options = ClientOptions(
        target=f"127.0.0.1:{port}", retries=8, backoff_seconds=0.1, timeout_seconds=60
    )
    async with AsyncShortlineClient(options) as client:
        stream = client.generate("hi", model="replay", max_tokens=9, ignore_eos=True)
        collecting = asyncio.create_task(stream.collect())
        await asyncio.sleep(0.4)  # the first attempts find nothing listening
        assert not collecting.done()
        async with scheduler_with_worker(embedded_triton.grpc_url, port):
            text = await asyncio.wait_for(collecting, 60)
    assert text.split()[-1] == "replay9"
    assert stream.result is not None and stream.result.actual_tokens == 9


async def test_no_retry_once_the_budget_is_spent() -> None:
    options = ClientOptions(target=f"127.0.0.1:{free_port()}", retries=1, backoff_seconds=0.01)
    async with AsyncShortlineClient(options) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.generate("hi", model="replay", max_tokens=3).collect()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_sync_client_streams_cancels_and_honours_deadlines(embedded_triton: Any) -> None:
    port = free_port()
    async with scheduler_with_worker(embedded_triton.grpc_url, port):
        outcome: dict[str, Any] = {}

        def use_sync_client() -> None:
            options = ClientOptions(target=f"127.0.0.1:{port}", timeout_seconds=60)
            with ShortlineClient(options) as client:
                stream = client.generate("go", model="replay", max_tokens=6, ignore_eos=True)
                outcome["text"] = "".join(stream)
                outcome["result"] = stream.result
                long = client.generate(
                    "go", model="replay", max_tokens=5000, ignore_eos=True, request_id="long-1"
                )
                it = iter(long)
                next(it)
                outcome["cancel_state"] = long.cancel()
                for _ in it:
                    pass
                outcome["cancelled"] = long.result
                late = client.generate(
                    "go", model="replay", max_tokens=5000, ignore_eos=True, timeout=0.5
                )
                try:
                    "".join(late)
                except grpc.RpcError as exc:
                    outcome["deadline"] = exc.code()

        thread = threading.Thread(target=use_sync_client)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.05)
    assert outcome["text"].split()[-1] == "replay6"
    assert outcome["result"].actual_tokens == 6
    assert outcome["cancel_state"] == "cancelled"
    assert outcome["cancelled"].finish_reason == "cancelled"
    assert outcome["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED


def test_options_from_files_read_the_ca_and_the_token(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shortline.client import ClientConfigError

    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.delenv("SHORTLINE_TOKEN", raising=False)
    monkeypatch.delenv("SHORTLINE_TOKEN_FILE", raising=False)

    plain = ClientOptions.from_files("h:1")
    assert (plain.tls, plain.root_certificates, plain.token) == (False, None, None)
    options = ClientOptions.from_files("h:1", ca_file=ca, token_file=token_file, retries=5)
    assert options.tls and options.root_certificates == ca.read_bytes()
    assert options.token == "from-file" and options.retries == 5
    # Precedence: the token given, its file, SHORTLINE_TOKEN, SHORTLINE_TOKEN_FILE.
    monkeypatch.setenv("SHORTLINE_TOKEN_FILE", str(token_file))
    assert ClientOptions.from_files("h:1").token == "from-file"
    monkeypatch.setenv("SHORTLINE_TOKEN", "from-env")
    assert ClientOptions.from_files("h:1").token == "from-env"
    assert ClientOptions.from_files("h:1", token_file=token_file).token == "from-file"
    assert ClientOptions.from_files("h:1", token="given", token_file=token_file).token == "given"
    with pytest.raises(ClientConfigError, match="cannot read CA file"):
        ClientOptions.from_files("h:1", ca_file=tmp_path / "missing.pem")
