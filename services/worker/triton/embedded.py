"""A real Triton Inference Server on 127.0.0.1, from the ``nvidia-pytriton`` wheel.

The wheel ships the ``tritonserver`` binary and the Python-backend stubs. We
do not use PyTriton's ``Triton.bind`` proxy: its inference callables never
learn that a client cancelled a stream, so a preempted sequence would keep
decoding in the shared batch. Instead each model is an ordinary Python-backend
model (``services.worker.triton.python_model``), the same structure as
Triton's vLLM backend, and cancellation reaches it within a decoding step.

Two pitfalls are handled here: the stub links ``libpython3.11`` dynamically
and would pick the system's copy, so ``LD_LIBRARY_PATH`` starts with this
interpreter's ``LIBDIR``; and the server runs in its own process group, so
that stopping it (SIGINT, then SIGKILL to the group after a grace period)
leaves no stub behind, and its shared-memory regions (named with our own
prefix) are removed afterwards.

Stopping cleanly needs one more thing. On SIGINT Triton stops taking requests
and unloads its models, but a model is unloaded only once no request holds it,
and a decoupled request (every stream here) holds it until its final response:
a stream whose client is still reading kept its model loaded past
``--exit-timeout-secs``, Triton logged "failed to stop server: Exit timeout
expired" and then waited for those streams to run to their end. So the server
and its stubs inherit the read end of a pipe whose only write end is ours
(``STOP_FD_ENV`` names it): we close it after SIGINT, or the kernel does when
this process dies, and each model (``python_model.py``) then ends its
sequences with an error at once, which releases the requests and lets the
models unload within Triton's next check (about a second).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from services.worker.config import TritonServeConfig
from services.worker.triton.repository import model_params, write_model
from shortline.common.net import free_port
from shortline.common.paths import REPO_ROOT, run_dir

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# The environment variable naming the stop pipe's read end, for the models.
STOP_FD_ENV = "SHORTLINE_TRITON_STOP_FD"
# tritonserver's own limit for unloading on a stop; ours (stop's grace) is longer.
EXIT_TIMEOUT_S = 5


def _pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver folder, bundled shared libraries) inside the nvidia-pytriton wheel."""
    import pytriton

    root = Path(pytriton.__file__).resolve().parent
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


# Runs as ``python -c`` between our fork and tritonserver: sets PR_SET_PDEATHSIG
# (die with the process that started us) and execs the server in place. Not a
# ``preexec_fn``: that runs Python in the forked child of a process whose gRPC
# threads are busy, and grpc's fork handlers then crash the child before exec
# (seen in CI: "Check failed: next_worker->state == KICKED", exit -11). Without
# a preexec_fn, subprocess uses vfork and no fork handler runs. The parent pid
# is checked after prctl, in case the parent died before it took effect.
_EXEC_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _EXEC_WITH_PARENT_DEATH_SIGNAL,
        str(os.getpid()),
        *args,
    ]


class EmbeddedTriton:
    """Starts ``tritonserver`` hosting the embedded models; a context manager."""

    def __init__(self, config: TritonServeConfig | None = None) -> None:
        self.config = config or TritonServeConfig()
        self.grpc_port = self.config.grpc_port or free_port(self.config.host)
        self.http_port = self.config.http_port or free_port(self.config.host)
        self.models = [m.strip() for m in self.config.models.split(",") if m.strip()]
        for name in self.models:
            model_params(name, self.config)  # fails early on an unknown name
        self.workspace: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_pipe: int | None = None  # the write end; closing it stops the models
        self._shm_prefix = f"shortline{os.getpid()}x{secrets.token_hex(4)}"

    @property
    def _local_host(self) -> str:
        return "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host

    @property
    def grpc_url(self) -> str:
        return f"{self._local_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._local_host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _prepare(self) -> list[str]:
        base = run_dir() / "triton"
        base.mkdir(parents=True, exist_ok=True)
        ws = base / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        ws.mkdir()
        self.workspace = ws
        dist, _ = _pytriton_dist()
        backend = ws / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(dist / "backends" / "python" / name, backend / name)
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, backend / "triton_python_backend_stub")
        repo = ws / "models"
        for name in self.models:
            write_model(repo, name, self.config, REPO_ROOT)
        self.log_path = ws / "tritonserver.log"
        return [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={ws / 'backends'}",
            f"--cache-directory={dist / 'caches'}",
            f"--grpc-address={self.config.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.config.host}",
            f"--http-port={self.http_port}",
            *self._metrics_args(),
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
        ]

    def _metrics_args(self) -> list[str]:
        if not self.config.metrics_port:
            return ["--allow-metrics=false"]
        return [
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={self.config.host}",
            f"--metrics-port={self.config.metrics_port}",
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        _, libs = _pytriton_dist()
        # The stub must load this interpreter's libpython, not the system's.
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        parts = [libdir, env.get("LD_LIBRARY_PATH", ""), str(libs)]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in parts if p)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self) -> EmbeddedTriton:
        args = self._prepare()
        assert self.log_path is not None
        log.info("starting Triton on grpc %s, http %s", self.grpc_url, self.http_url)
        # Not inheritable (os.pipe's default): only the server gets the read end.
        read_end, self._stop_pipe = os.pipe()
        try:
            with open(self.log_path, "wb") as out:
                self._proc = subprocess.Popen(
                    _with_parent_death_signal(args),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**self._env(), STOP_FD_ENV: str(read_end)},
                    cwd=self.workspace,
                    start_new_session=True,
                    pass_fds=(read_end,),
                )
        finally:
            os.close(read_end)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready on %s with %s", self.grpc_url, ", ".join(self.models))
        return self

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=1.0) as resp,
            ):
                if resp.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(
            f"Triton not ready after {self.config.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops the server and its stubs, waits for them, removes shared memory and workspace."""
        proc = self._proc
        clean = True
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                # After SIGINT (no new request reaches a model now): the models end
                # what they run, so Triton can unload them.
                self._close_stop_pipe()
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing it", grace_s)
            clean = proc.returncode == 0
            # The stubs share the server's process group; nothing of it may survive.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            self._proc = None
        self._close_stop_pipe()
        for leftover in SHM_DIR.glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if self.workspace is not None and self.workspace.exists():
            if clean:
                shutil.rmtree(self.workspace, ignore_errors=True)
            else:  # keep the server log for a post-mortem
                shutil.rmtree(self.workspace / "backends", ignore_errors=True)
                shutil.rmtree(self.workspace / "models", ignore_errors=True)
                log.warning("Triton did not exit cleanly; its log: %s", self.log_path)

    def _close_stop_pipe(self) -> None:
        if self._stop_pipe is not None:
            with contextlib.suppress(OSError):
                os.close(self._stop_pipe)
            self._stop_pipe = None

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
