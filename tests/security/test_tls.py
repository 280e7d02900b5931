"""TLS and mutual TLS as an attacker meets them, on real sockets with real certificates.

Two CAs are made by ``shortline certs``: the operator's (scheduler, predictor,
worker-1, worker-2) and another one (a worker-1 certificate the operator never
issued). Every attack of issue 15 that needs only the network now fails: a
plaintext client on a TLS port, a fake worker without the CA's certificate or
with another CA's, an impostor of a registered worker id (register and
heartbeat), direct Execute/Cancel on a worker; while the real parties work,
end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from services.worker.config import WorkerConfig
from services.worker.service.server import WorkerServer
from shortline.certs import ensure
from shortline.client import AsyncShortlineClient, ClientOptions
from shortline.common import tls
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import (
    internal_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    ensure(root / "ours", ["scheduler", "predictor", "worker-1", "worker-2"])
    ensure(root / "other", ["worker-1"])
    return root


def files(pki: Path, name: str, ca: str = "ours") -> dict[str, Any]:
    """A service's TLS settings: its certificate and key, and our CA."""
    d = pki / ca
    return {
        "tls_cert": str(d / f"{name}.pem"),
        "tls_key": str(d / f"{name}.key"),
        "tls_ca": str(pki / "ours" / "ca.pem"),
    }


def as_(pki: Path, name: str, ca: str = "ours") -> tls.TlsMaterial:
    """A caller holding ``name``'s certificate from ``ca`` (and trusting our CA)."""
    return tls.load(tls.TlsSettings(**files(pki, name, ca)))


def no_cert(pki: Path) -> tls.TlsMaterial:
    """A caller that trusts our CA but has no certificate of its own."""
    return tls.TlsMaterial(ca=(pki / "ours" / "ca.pem").read_bytes())


def channel(target: str, material: tls.TlsMaterial | None) -> grpc.aio.Channel:
    if material is None:
        return grpc.aio.insecure_channel(target)
    creds = tls.channel_credentials(material)
    assert creds is not None
    return grpc.aio.secure_channel(target, creds)


@contextlib.asynccontextmanager
async def scheduler(pki: Path, tmp: Path, **cfg: Any) -> AsyncIterator[SchedulerServer]:
    server = SchedulerServer(
        SchedulerConfig(
            host="127.0.0.1",
            port=free_port(),
            internal_port=0,
            heartbeat_interval_s=0.2,
            outcome_log=str(tmp / "outcomes.sqlite"),
            **{**files(pki, "scheduler"), **cfg},
        )
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.1)


async def code_of(call: Any) -> grpc.StatusCode:
    """The status code a unary call or a stream ends with (OK if it ends well)."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def registration(worker_id: str, address: str, slots: int = 2) -> Any:
    return scheduler_pb2.RegisterWorkerRequest(
        worker_id=worker_id, address=address, slots=slots, models=["replay"]
    )


async def test_public_port_speaks_tls_only_and_asks_no_client_certificate(
    pki: Path, tmp_path: Path
) -> None:
    async with scheduler(pki, tmp_path) as s:
        request = scheduler_pb2.GetStatsRequest()
        async with channel(s.address, None) as plain:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(plain)
            assert await code_of(stub.GetStats(request, timeout=5)) == UNAVAILABLE
        # A client with only the CA (no certificate): the public port never asks for one.
        async with channel(s.address, no_cert(pki)) as secure:
            stats = await scheduler_pb2_grpc.SchedulerServiceStub(secure).GetStats(
                request, timeout=5
            )
        assert stats.policy
        # A client verifying against another CA refuses the scheduler.
        other = tls.TlsMaterial(ca=(pki / "other" / "ca.pem").read_bytes())
        async with channel(s.address, other) as wrong:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(wrong)
            assert await code_of(stub.GetStats(request, timeout=5)) == UNAVAILABLE


async def test_only_the_cas_certificates_can_reach_the_internal_port(
    pki: Path, tmp_path: Path
) -> None:
    async with scheduler(pki, tmp_path) as s:
        attempts = {
            "plaintext": None,
            "no certificate": no_cert(pki),
            "another CA's worker-1": as_(pki, "worker-1", "other"),
        }
        for what, material in attempts.items():
            async with channel(s.internal_address, material) as ch:
                stub = internal_pb2_grpc.SchedulerInternalServiceStub(ch)
                code = await code_of(
                    stub.RegisterWorker(registration("worker-1", "127.0.0.1:1"), timeout=5)
                )
                assert code == UNAVAILABLE, what
                assert await code_of(stub.GetStats(scheduler_pb2.GetStatsRequest())) == UNAVAILABLE
        assert len(s.plane.workers) == 0
        async with channel(s.internal_address, as_(pki, "worker-1")) as ch:
            stub = internal_pb2_grpc.SchedulerInternalServiceStub(ch)
            await stub.RegisterWorker(registration("worker-1", "127.0.0.1:1111"), timeout=5)
        assert "worker-1" in s.plane.workers


async def test_an_impostor_cannot_take_or_keep_alive_a_registered_worker_id(
    pki: Path, tmp_path: Path
) -> None:
    async with scheduler(pki, tmp_path) as s:
        async with channel(s.internal_address, as_(pki, "worker-1")) as real:
            stub = internal_pb2_grpc.SchedulerInternalServiceStub(real)
            await stub.RegisterWorker(registration("worker-1", "127.0.0.1:1111"), timeout=5)

        async with channel(s.internal_address, as_(pki, "worker-2")) as impostor:
            stub = internal_pb2_grpc.SchedulerInternalServiceStub(impostor)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RegisterWorker(registration("worker-1", "127.0.0.1:6666", 64))
            assert err.value.code() == DENIED
            details = err.value.details() or ""
            assert "worker-2" in details and "worker-1" in details
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="worker-1"))
            assert err.value.code() == DENIED
            # Any certificate of the CA may read the pool with addresses (operators).
            pool = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        assert [(w.worker_id, w.address, w.slots_total) for w in pool.workers] == [
            ("worker-1", "127.0.0.1:1111", 2)
        ]
        handle = s.plane.workers.get("worker-1")
        assert handle is not None and handle.address == "127.0.0.1:1111" and handle.slots == 2

        # The real worker's own heartbeat is still accepted.
        async with channel(s.internal_address, as_(pki, "worker-1")) as real:
            stub = internal_pb2_grpc.SchedulerInternalServiceStub(real)
            beat = await stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="worker-1"))
        assert beat.known


async def test_service_certificates_and_unlisted_names_are_not_workers(
    pki: Path, tmp_path: Path
) -> None:
    async with scheduler(pki, tmp_path, worker_identities="worker-1,predictor") as s:
        cases = {"scheduler": DENIED, "worker-2": DENIED, "predictor": grpc.StatusCode.OK}
        for name, expected in cases.items():
            async with channel(s.internal_address, as_(pki, name)) as ch:
                stub = internal_pb2_grpc.SchedulerInternalServiceStub(ch)
                code = await code_of(stub.RegisterWorker(registration(name, "127.0.0.1:1")))
            assert code == expected, name
    async with scheduler(pki, tmp_path) as s:
        for name in ("scheduler", "predictor"):
            async with channel(s.internal_address, as_(pki, name)) as ch:
                stub = internal_pb2_grpc.SchedulerInternalServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.RegisterWorker(registration(name, "127.0.0.1:1"))
            assert err.value.code() == DENIED
            assert "belongs to a service" in (err.value.details() or "")
        assert len(s.plane.workers) == 0


def _execute(job: str, max_tokens: int) -> Any:
    return worker_pb2.ExecuteRequest(
        job_id=job,
        model="replay",
        prompt="go",
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )


async def test_workers_run_and_stop_jobs_only_for_the_schedulers_certificate(
    pki: Path, embedded_triton: Any
) -> None:
    worker = WorkerServer(
        WorkerConfig(slots=2, health_poll_s=0.5, **files(pki, "worker-1")),
        embedded_triton.grpc_url,
    )
    await worker.start()
    try:
        assert worker.worker_id == "worker-1"  # the certificate's name by default
        async with (
            channel(worker.address, as_(pki, "scheduler")) as sched_ch,
            channel(worker.address, as_(pki, "worker-2")) as peer_ch,
            channel(worker.address, no_cert(pki)) as anon_ch,
        ):
            sched = worker_pb2_grpc.WorkerServiceStub(sched_ch)
            peer = worker_pb2_grpc.WorkerServiceStub(peer_ch)
            anon = worker_pb2_grpc.WorkerServiceStub(anon_ch)
            victim = sched.Execute(_execute("victim", 60))
            first: Any = await victim.read()
            assert first.HasField("delta")

            # Another worker's certificate: refused, naming who may call.
            for call in (
                peer.Cancel(worker_pb2.CancelRequest(job_id="victim")),
                peer.Preempt(worker_pb2.PreemptRequest(job_id="victim")),
                peer.Execute(_execute("stolen", 5)),
                peer.GetCapacity(worker_pb2.GetCapacityRequest()),
            ):
                assert await code_of(call) == DENIED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await peer.Cancel(worker_pb2.CancelRequest(job_id="victim"))
            assert "worker-2" in (err.value.details() or "")
            assert "scheduler" in (err.value.details() or "")
            # No certificate at all: the handshake fails.
            assert await code_of(anon.Cancel(worker_pb2.CancelRequest(job_id="victim"))) == (
                UNAVAILABLE
            )

            # The victim's job ran to its end, untouched.
            text = first.delta.text
            result = None
            eof = grpc.aio.EOF  # type: ignore[attr-defined]
            msg: Any
            while (msg := await victim.read()) is not eof:
                if msg.HasField("delta"):
                    text += msg.delta.text
                else:
                    result = msg.result
            assert result is not None and result.tokens == 60
            assert result.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert text == "".join(f" replay{i}" for i in range(1, 61))
            # The scheduler's certificate passes the check (the job is simply gone now).
            gone = sched.Cancel(worker_pb2.CancelRequest(job_id="victim"))
            assert await code_of(gone) == grpc.StatusCode.NOT_FOUND
            capacity = await sched.GetCapacity(worker_pb2.GetCapacityRequest())
            assert capacity.worker_id == "worker-1"
    finally:
        await worker.stop(0.1)


async def test_a_request_streams_end_to_end_with_tls_and_mutual_tls(
    pki: Path, tmp_path: Path, embedded_triton: Any
) -> None:
    async with scheduler(pki, tmp_path) as s:
        worker = WorkerServer(
            WorkerConfig(
                triton=embedded_triton.grpc_url,
                slots=2,
                scheduler=s.internal_address,
                health_poll_s=0.5,
                **files(pki, "worker-1"),
            ),
            embedded_triton.grpc_url,
        )
        await worker.start()
        try:
            for _ in range(250):
                if "worker-1" in s.plane.workers:
                    break
                await asyncio.sleep(0.02)
            handle = s.plane.workers.get("worker-1")
            assert handle is not None and handle.address == worker.address
            options = ClientOptions.from_files(
                s.address, ca_file=pki / "ours" / "ca.pem", timeout_seconds=60
            )
            assert options.tls
            async with AsyncShortlineClient(options) as client:
                stream = client.generate(
                    "go", model="replay", max_tokens=12, ignore_eos=True, length_model=""
                )
                text = "".join([t async for t in stream])
            assert text == "".join(f" replay{i}" for i in range(1, 13))
            assert stream.result is not None
            assert stream.result.actual_tokens == 12 and stream.result.worker_id == "worker-1"
        finally:
            await worker.stop(0.1)


def test_bad_tls_files_fail_at_start_naming_the_file(pki: Path, tmp_path: Path) -> None:
    ours = pki / "ours"
    cases = {
        "cannot read --tls-cert": {**files(pki, "scheduler"), "tls_cert": str(tmp_path / "nope")},
        "is not the key of": {**files(pki, "scheduler"), "tls_key": str(ours / "worker-1.key")},
        "given together": {"tls_cert": str(ours / "scheduler.pem")},
        "needs --tls-cert": {"tls_ca": str(ours / "ca.pem")},
    }
    for message, settings in cases.items():
        with pytest.raises(tls.TlsConfigError, match=message):
            SchedulerServer(SchedulerConfig(port=free_port(), internal_port=0, **settings))
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(tls.TlsConfigError, match="is not a certificate"):
        WorkerServer(
            WorkerConfig(**{**files(pki, "worker-1"), "tls_cert": str(tmp_path / "junk.pem")}),
            "127.0.0.1:1",
        )
