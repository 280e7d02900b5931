"""``shortline triton serve`` runs until SIGTERM or SIGINT and leaves nothing behind:
no tritonserver, no Python-backend stub, no shared-memory region."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from shortline.common.net import free_port
from shortline.common.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            found += [child, *_children(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_triton_serve_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "shortline.cli", "triton", "serve", "--models", "replay"]
    cmd += ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"grpc=127.0.0.1:{grpc_port}" in line, line
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready("replay")
        client.close()
        descendants = _children(proc.pid)
        assert len(descendants) >= 2  # tritonserver and the replay stub
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 20
        assert not [p for p in descendants if _alive(p)]
        assert not list(Path("/dev/shm").glob(f"shortline{proc.pid}x*"))
    finally:
        if proc.poll() is None:
            proc.kill()
