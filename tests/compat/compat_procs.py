"""Services of one release or another as real processes, for the version-skew test.

A release is a source tree: the current checkout, or a ``git worktree`` of an older
tag with its protobuf code generated. Every process runs with this venv's
interpreter; an older release's tree comes first on ``sys.path`` (``PYTHONPATH``
and the working directory), so its ``shortline`` and ``services`` packages shadow
the editable install. Each process prints where it imported them from before the
CLI starts, and the test checks that line: a skew test that silently ran the
current code on both sides would pass whatever the contracts did.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2

# Runs the CLI as ``python -m shortline.cli`` would, after printing the import
# origin. PR_SET_PDEATHSIG: a SIGTERM when the test process dies, so a killed test
# run leaves no service (and no Triton) behind. Popen from the main thread only:
# the signal follows the thread that started the child.
_MARKER = "compat-import-origin"
_WRAPPER = (
    "import ctypes, runpy, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "import services, shortline\n"
    f"print({_MARKER!r}, shortline.__file__, services.__file__, flush=True)\n"
    "runpy.run_module('shortline.cli', run_name='__main__', alter_sys=True)\n"
)

# SIGTERM drains; a service that outlives this after it is killed.
STOP_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Release:
    """A source tree the services and the SDK can run from."""

    name: str  # "current" or the tag
    root: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["PYTHONPATH"] = str(self.root)
        return env


@dataclasses.dataclass
class Service:
    name: str
    release: Release
    log_path: Path
    proc: subprocess.Popen[bytes]

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def imported_from(self) -> Path:
        """The tree ``shortline`` was imported from, as the process printed it."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(_MARKER):
                    return Path(line.split()[1]).resolve().parent.parent
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no import origin printed\n{self.tail()}")

    def check_origin(self) -> None:
        origin = self.imported_from()
        assert origin == self.release.root.resolve(), (
            f"{self.name} should run {self.release.name} from {self.release.root}, "
            f"but imported shortline from {origin}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(STOP_TIMEOUT_S)


def start(name: str, release: Release, args: list[str], log_dir: Path) -> Service:
    """``shortline <args>`` of ``release``, its output in ``log_dir/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, *args],
            cwd=release.root,
            env=release.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Service(name, release, log_path, proc)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, *services: Service) -> None:
    """Polls ``predicate``; fails naming ``what`` (and showing the services' logs) on
    timeout, or at once when one of ``services`` exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [s for s in services if s.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{dead[0].name} exited {dead[0].proc.returncode}" if dead else "timed out"
            logs = "\n".join(f"--- {s.name} ---\n{s.tail()}" for s in services)
            raise AssertionError(f"{what}: {why}\n{logs}")
        time.sleep(0.1)


def grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def pool(internal_address: str) -> dict[str, scheduler_pb2.WorkerStatus]:
    """The scheduler's workers by id (its internal GetStats), empty if it does not answer."""
    with grpc.insecure_channel(internal_address) as channel:
        stub = internal_pb2_grpc.SchedulerInternalServiceStub(channel)
        try:
            stats = stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=2.0)
        except grpc.RpcError:
            return {}
    return {w.worker_id: w for w in stats.workers}


@dataclasses.dataclass
class Backends:
    """What every combination calls and that the skew is not about: Triton with only
    the replay model (seconds to load, unlike SmolLM2) and the predictor, both current."""

    triton: Service
    triton_url: str
    predictor: Service
    predictor_address: str

    def wait_ready(self) -> None:
        both = (self.triton, self.predictor)
        wait_for(lambda: triton_ready(self.triton_url), 120, "Triton ready", *both)
        wait_for(lambda: grpc_serving(self.predictor_address), 120, "predictor SERVING", *both)
        for service in both:
            service.check_origin()


def triton_ready(url: str) -> bool:
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    client = triton_grpc.InferenceServerClient(url)
    try:
        return bool(client.is_model_ready("replay"))
    except InferenceServerException:
        return False
    finally:
        client.close()
