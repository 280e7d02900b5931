"""``shortline triton serve`` stops cleanly and quickly on SIGTERM even while streams
run: Triton unloads a model only once no request holds it, so the models end their
sequences when the server stops (embedded.py's stop pipe). Before, a stream whose
client kept reading held its model past the exit timeout: Triton logged "failed to
stop server: Exit timeout expired" and then waited for the streams to finish.

It also stops so after serving through a worker. The worker cancelled each Triton
stream as its job ended, just after the final response; a cancel landing before
Triton ended the stream left a request in Triton's gRPC frontend for good, so the
model never unloaded ("Found 1 live models and 0 in-flight non-inference requests"
for the whole exit timeout). A stream whose request is over is no longer cancelled
(triton_client.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from processes import alive, assert_nothing_left, descendants, shm_regions

from services.worker.config import TritonServeConfig, WorkerConfig
from services.worker.service.server import WorkerServer
from services.worker.service.triton_client import TritonClient, TritonRequestError
from services.worker.triton.embedded import EXIT_TIMEOUT_S, EmbeddedTriton
from shortline.common.net import free_port
from shortline.common.paths import REPO_ROOT
from shortline.common.v1 import common_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.slow

# Jobs through the worker before its Triton stops: 8 rounds of 16 (about 3 s).
ROUNDS = 8


async def _stream(client: TritonClient, i: int) -> str:
    """A stream far longer than the test; how it ended."""
    params = {"max_tokens": 20000, "ignore_eos": True}
    stream = await client.stream("replay", "go", params, request_id=f"s{i}")
    try:
        async for _ in stream:
            pass
    except TritonRequestError as exc:
        return str(exc)
    return "finished"


async def test_triton_serve_stops_quickly_and_cleanly_with_streams_running(
    tmp_path: Path,
) -> None:
    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "shortline.cli", "triton", "serve", "--models", "replay"]
    cmd += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    cmd += ["--replay-step-a-ms", "10", "--replay-step-b-ms", "1"]
    shm_before = shm_regions()
    env = {**os.environ, "SHORTLINE_RUN_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while "triton ready" not in seen and proc.poll() is None:
            seen += await asyncio.to_thread(proc.stdout.readline)
        assert f"grpc=127.0.0.1:{grpc_port}" in seen, seen
        client = TritonClient(f"127.0.0.1:{grpc_port}")
        streams = [asyncio.create_task(_stream(client, i)) for i in range(6)]
        await asyncio.sleep(1.5)  # all decoding in one batch
        assert not any(s.done() for s in streams)
        children = descendants(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ends = await asyncio.wait_for(asyncio.gather(*streams), 10)
        code = await asyncio.to_thread(proc.wait, 30)
        took = time.monotonic() - sent
        await client.close()
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, output
    assert took < 6, f"stop took {took:.1f} s"
    assert all("unloading" in e for e in ends), ends  # an error at once, not a hang
    assert "did not exit cleanly" not in output and "did not stop" not in output, output
    logs = list((tmp_path / "triton").rglob("tritonserver.log"))
    assert not logs, "a clean stop removes the workspace; one kept its log:\n" + "\n".join(
        p.read_text()[-1500:] for p in logs
    )
    assert_nothing_left(children, shm_before)


async def _execute(stub: Any, job_id: str, tokens: int) -> str:
    """One job through the worker to its end; the text it streamed."""
    request = worker_pb2.ExecuteRequest(
        job_id=job_id,
        model="replay",
        prompt="go",
        max_tokens=tokens,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )
    text = ""
    async for msg in stub.Execute(request):
        if msg.HasField("delta"):
            text += msg.delta.text
    return text


async def test_triton_stops_quickly_and_cleanly_after_serving_through_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix a few of these streams in a hundred kept the model loaded, and
    one is enough to run the stop into the exit timeout."""
    monkeypatch.setenv("SHORTLINE_RUN_DIR", str(tmp_path))
    shm_before = shm_regions()
    triton = EmbeddedTriton(
        TritonServeConfig(models="replay", replay_step_a_ms=10, replay_step_b_ms=1)
    )
    await asyncio.to_thread(triton.start)
    log_path = triton.log_path
    assert log_path is not None
    try:
        worker = WorkerServer(WorkerConfig(slots=16, health_poll_s=0.2), triton.grpc_url)
        await worker.start()
        try:
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                for round_ in range(ROUNDS):
                    jobs = [_execute(stub, f"j{round_}-{i}", 20) for i in range(16)]
                    texts = await asyncio.gather(*jobs)
                    expected = "".join(f" replay{k}" for k in range(1, 21))
                    assert texts == [expected] * 16
        finally:
            await worker.stop(0.5)
        children = descendants(triton.pid or 0)
        sent = time.monotonic()
        await asyncio.to_thread(triton.stop)
        took = time.monotonic() - sent
    finally:
        if triton.is_running():
            triton.stop()
    kept = log_path.read_text()[-1500:] if log_path.exists() else ""
    assert not kept, "Triton did not exit cleanly (its log is kept):\n" + kept
    assert took < EXIT_TIMEOUT_S - 1, f"stop took {took:.1f} s"
    await asyncio.sleep(0.5)
    assert not [pid for pid in children if alive(pid)], "processes left behind"
    # Its stubs' regions are named after this process (embedded.py).
    ours = f"shortline{os.getpid()}x"
    leaked = sorted(p.name for p in shm_regions() - shm_before if p.name.startswith(ours))
    assert not leaked, f"shared memory left behind: {leaked}"


async def test_triton_goes_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A starter killed with SIGKILL runs no cleanup; the kernel's parent-death signal
    (set between fork and exec, embedded.py) still stops its tritonserver, whose
    process is the server itself (the wrapper exec'd it, no Python left between)."""
    cmd = [sys.executable, "-m", "shortline.cli", "triton", "serve", "--models", "replay"]
    cmd += ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    env = {**os.environ, "SHORTLINE_RUN_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = 0
    try:
        assert proc.stdout is not None
        seen = ""
        while "triton ready" not in seen and proc.poll() is None:
            seen += await asyncio.to_thread(proc.stdout.readline)
        assert "triton ready" in seen, seen
        children = descendants(proc.pid)
        servers = [p for p in children if os.readlink(f"/proc/{p}/exe").endswith("tritonserver")]
        assert len(servers) == 1, children
        (server,) = servers
        ppid = int(Path(f"/proc/{server}/stat").read_text().split()[3])
        assert ppid == proc.pid  # a direct child: nothing between the starter and the server
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while alive(server) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not alive(server), "tritonserver outlived the process that started it"
    finally:
        if proc.poll() is None:
            proc.kill()
        if server and alive(server):
            os.killpg(server, signal.SIGKILL)  # its own process group, stubs included
