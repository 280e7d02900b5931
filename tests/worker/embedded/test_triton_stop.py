"""``shortline triton serve`` stops cleanly and quickly on SIGTERM even while streams
run: Triton unloads a model only once no request holds it, so the models end their
sequences when the server stops (embedded.py's stop pipe). Before, a stream whose
client kept reading held its model past the exit timeout: Triton logged "failed to
stop server: Exit timeout expired" and then waited for the streams to finish."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import assert_nothing_left, descendants, shm_regions

from services.worker.service.triton_client import TritonClient, TritonRequestError
from shortline.common.net import free_port
from shortline.common.paths import REPO_ROOT

pytestmark = pytest.mark.slow


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
