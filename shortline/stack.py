"""The local stack: every service as a child process on 127.0.0.1.

What ``make run`` starts. The launcher owns its children: it puts each in its
own session (so a terminal's Ctrl-C reaches only the launcher, which then
stops them in order), waits until every health check says SERVING, and on
SIGINT or SIGTERM stops them in reverse order, escalating to SIGKILL after a
grace period so no process is left behind and every port is released.

With ``tls`` (``shortline up --tls``) every listener speaks TLS and the
services call each other with mutual TLS: the launcher makes a development CA
and one certificate per service in ``certs_dir`` (``shortline certs``) and a
tokens file with one token for tenant ``dev``, whose clear text goes to
``token`` beside it (mode 0600; printed as a path, never as the token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.scheduler.core.policies import DEFAULT_POLICY
from shortline.common import tls as tls_mod

if TYPE_CHECKING:
    from shortline.client import ClientOptions

# The launcher's own certificate: its health checks reach services with mutual TLS.
LAUNCHER = "launcher"


class StackError(RuntimeError):
    """A one-line, actionable reason the stack could not start."""


@dataclasses.dataclass(frozen=True)
class StackConfig:
    host: str = "127.0.0.1"
    scheduler_port: int = dataclasses.field(
        default=50051, metadata={"help": "scheduler gRPC port (the address clients use)"}
    )
    scheduler_internal_port: int = dataclasses.field(
        default=50052, metadata={"help": "scheduler's internal port (workers register there)"}
    )
    predictor_port: int = dataclasses.field(default=50061, metadata={"help": "predictor gRPC port"})
    worker_base_port: int = dataclasses.field(
        default=50071, metadata={"help": "first worker's gRPC port; worker i uses base + i"}
    )
    triton_grpc_port: int = dataclasses.field(
        default=8101, metadata={"help": "embedded Triton's gRPC port"}
    )
    triton_http_port: int = dataclasses.field(
        default=8100, metadata={"help": "embedded Triton's HTTP port"}
    )
    triton_metrics_port: int = dataclasses.field(
        default=8102, metadata={"help": "embedded Triton's metrics port"}
    )
    metrics_base_port: int = dataclasses.field(
        default=9400,
        metadata={"help": "Prometheus ports: scheduler base, predictor +1, workers +2.."},
    )
    workers: int = dataclasses.field(default=2, metadata={"help": "number of workers"})
    slots: int = dataclasses.field(default=8, metadata={"help": "slots (sequences) per worker"})
    policy: str = dataclasses.field(
        default=DEFAULT_POLICY,
        metadata={"help": "fcfs | ssjf | ssjf-aging, optionally +preempt"},
    )
    batching: str = dataclasses.field(
        default="continuous", metadata={"help": "none | dynamic | continuous"}
    )
    replay_step_a_ms: float = dataclasses.field(
        default=20.0, metadata={"help": "replay model's fixed time per decoding step"}
    )
    replay_step_b_ms: float = dataclasses.field(
        default=2.0, metadata={"help": "replay model's time per sequence in a step"}
    )
    startup_timeout_s: float = dataclasses.field(
        default=300.0, metadata={"help": "how long to wait for every service to be SERVING"}
    )
    log_dir: str = dataclasses.field(
        default="", metadata={"help": "where each service's log goes (default .run/logs)"}
    )
    extra_scheduler_args: str = dataclasses.field(
        default="", metadata={"help": "extra flags passed to `shortline scheduler serve`"}
    )
    triton_models: str = dataclasses.field(
        default="", metadata={"help": "models Triton loads, comma-separated (default: all)"}
    )
    tls: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "TLS on every listener, mutual TLS between services, a token for clients "
            "(certificates and token made if missing)"
        },
    )
    certs_dir: str = dataclasses.field(
        default="", metadata={"help": "with --tls: CA and certificates (default .run/certs)"}
    )
    tokens_file: str = dataclasses.field(
        default="",
        metadata={
            "help": "scheduler's tokens file (with --tls default .run/tokens.toml, made with "
            "one token for tenant dev, written to `token` beside it)"
        },
    )

    def certs_path(self) -> Path:
        return Path(self.certs_dir) if self.certs_dir else _run_dir() / "certs"

    def tokens_path(self) -> Path | None:
        if self.tokens_file:
            return Path(self.tokens_file)
        return _run_dir() / "tokens.toml" if self.tls else None

    def token_path(self) -> Path | None:
        """Where the development token is in clear (beside the tokens file)."""
        tokens = self.tokens_path()
        return None if tokens is None else tokens.with_name("token")


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    health_address: str | None  # gRPC health endpoint; None: checked otherwise
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def all_ports(cfg: StackConfig) -> dict[str, int]:
    ports = {
        "scheduler": cfg.scheduler_port,
        "scheduler internal": cfg.scheduler_internal_port,
        "predictor": cfg.predictor_port,
        "triton grpc": cfg.triton_grpc_port,
        "triton http": cfg.triton_http_port,
        "triton metrics": cfg.triton_metrics_port,
        "scheduler metrics": cfg.metrics_base_port,
        "predictor metrics": cfg.metrics_base_port + 1,
    }
    for i in range(cfg.workers):
        ports[f"worker-{i + 1}"] = cfg.worker_base_port + i
        ports[f"worker-{i + 1} metrics"] = cfg.metrics_base_port + 2 + i
    return ports


def check_ports(cfg: StackConfig) -> None:
    seen: dict[int, str] = {}
    for name, port in all_ports(cfg).items():
        if port in seen:
            raise StackError(f"port {port} is given to both {seen[port]} and {name}")
        seen[port] = name
        if not port_is_free(cfg.host, port):
            raise StackError(
                f"port {port} ({name}) on {cfg.host} is already in use; "
                "stop what holds it or choose another port flag"
            )


def _tls_args(cfg: StackConfig, identity: str) -> list[str]:
    """A service's own certificate and the CA, with ``tls``."""
    d = cfg.certs_path()
    pem, key, ca = (str(d / n) for n in (f"{identity}.pem", f"{identity}.key", "ca.pem"))
    return ["--tls-cert", pem, "--tls-key", key, "--tls-ca", ca] if cfg.tls else []


def plan(cfg: StackConfig) -> list[Child]:
    """The children, in start order."""
    exe = [sys.executable, "-m", "shortline.cli"]
    h = cfg.host
    tokens = cfg.tokens_path()
    children = [
        Child(
            "triton",
            [
                *exe,
                "triton",
                "serve",
                "--grpc-port",
                str(cfg.triton_grpc_port),
                "--http-port",
                str(cfg.triton_http_port),
                "--metrics-port",
                str(cfg.triton_metrics_port),
                "--replay-step-a-ms",
                str(cfg.replay_step_a_ms),
                "--replay-step-b-ms",
                str(cfg.replay_step_b_ms),
                *(["--models", cfg.triton_models] if cfg.triton_models else []),
            ],
            None,
        ),
        Child(
            "predictor",
            [
                *exe,
                "predictor",
                "serve",
                "--port",
                str(cfg.predictor_port),
                "--metrics-port",
                str(cfg.metrics_base_port + 1),
                *_tls_args(cfg, "predictor"),
            ],
            f"{h}:{cfg.predictor_port}",
        ),
        Child(
            "scheduler",
            [
                *exe,
                "scheduler",
                "serve",
                "--port",
                str(cfg.scheduler_port),
                "--internal-port",
                str(cfg.scheduler_internal_port),
                "--predictor",
                f"{h}:{cfg.predictor_port}",
                "--policy",
                cfg.policy,
                "--batching",
                cfg.batching,
                "--metrics-port",
                str(cfg.metrics_base_port),
                *_tls_args(cfg, "scheduler"),
                *(["--tokens-file", str(tokens)] if tokens is not None else []),
                *cfg.extra_scheduler_args.split(),
            ],
            f"{h}:{cfg.scheduler_port}",
        ),
    ]
    for i in range(cfg.workers):
        children.append(
            Child(
                f"worker-{i + 1}",
                [
                    *exe,
                    "worker",
                    "serve",
                    "--triton",
                    f"{h}:{cfg.triton_grpc_port}",
                    "--port",
                    str(cfg.worker_base_port + i),
                    "--slots",
                    str(cfg.slots),
                    "--scheduler",
                    f"{h}:{cfg.scheduler_internal_port}",
                    "--worker-id",
                    f"worker-{i + 1}",
                    "--metrics-port",
                    str(cfg.metrics_base_port + 2 + i),
                    *_tls_args(cfg, f"worker-{i + 1}"),
                ],
                f"{h}:{cfg.worker_base_port + i}",
            )
        )
    return children


def grpc_serving(
    address: str, timeout: float = 1.0, material: tls_mod.TlsMaterial | None = None
) -> bool:
    """The service's gRPC health check says SERVING; over TLS with ``material`` (its CA,
    and a certificate for services with mutual TLS)."""
    creds = tls_mod.channel_credentials(material or tls_mod.TlsMaterial())
    try:
        channel = (
            grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)
        )
        with channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def triton_ready(host: str, grpc_port: int) -> bool:
    import tritonclient.grpc as tc

    try:
        client = tc.InferenceServerClient(f"{host}:{grpc_port}")
        try:
            return bool(client.is_server_ready(client_timeout=1.0))
        finally:
            client.close()
    except Exception:
        return False


class Stack:
    """Starts and stops the children; usable as a context manager in tests."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.children = plan(cfg)
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else _default_log_dir()
        self._stopping = False
        self._health_tls: tls_mod.TlsMaterial | None = None

    @property
    def scheduler_address(self) -> str:
        return f"{self.cfg.host}:{self.cfg.scheduler_port}"

    def client_options(self, **options: Any) -> ClientOptions:
        """The SDK's options for this stack's scheduler: its CA and token with ``tls``."""
        from shortline.client import ClientOptions

        token = self.cfg.token_path()
        return ClientOptions.from_files(
            self.scheduler_address,
            ca_file=self.cfg.certs_path() / "ca.pem" if self.cfg.tls else None,
            token_file=token if token is not None and token.exists() else None,
            **options,
        )

    def prepare_credentials(self) -> list[Path]:
        """With ``tls``: the certificates and the development token, made where missing
        (an expiring certificate is issued again); returns the files written."""
        if not self.cfg.tls:
            return []
        from shortline import certs

        d, tokens, token = self.cfg.certs_path(), self.cfg.tokens_path(), self.cfg.token_path()
        assert tokens is not None and token is not None
        try:
            names = certs.identities(self.cfg.workers, [LAUNCHER])
            written = certs.dev_credentials(d, names, tokens, token)
        except certs.CertsError as exc:
            raise StackError(str(exc)) from exc
        self._health_tls = tls_mod.client_material(
            str(d / "ca.pem"), str(d / f"{LAUNCHER}.pem"), str(d / f"{LAUNCHER}.key")
        )
        return written

    def start(self) -> None:
        check_ports(self.cfg)
        if self.cfg.tls and self._health_tls is None:
            self.prepare_credentials()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            for child in self.children:
                child.log_path = self.log_dir / f"{child.name}.log"
                log = child.log_path.open("wb")
                child.process = subprocess.Popen(
                    child.argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
                log.close()
                if child.name in ("triton", "predictor"):
                    # Workers report NOT_SERVING until Triton is ready, and a scheduler
                    # that finds no predictor at start (it lists its heads) predicts by
                    # fallback until its channel's reconnect backoff ends: wait for both.
                    self._wait_for([child])
            self._wait_for(self.children)
        except BaseException:
            self.stop()
            raise

    def _wait_for(self, children: Sequence[Child]) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        pending = list(children)
        while pending:
            for child in list(pending):
                assert child.process is not None
                if child.process.poll() is not None:
                    raise StackError(
                        f"{child.name} exited with code {child.process.returncode} during "
                        f"start-up; see {child.log_path}"
                    )
                ok = (
                    triton_ready(self.cfg.host, self.cfg.triton_grpc_port)
                    if child.health_address is None
                    else grpc_serving(child.health_address, material=self._health_tls)
                )
                if ok:
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StackError(
                    f"not SERVING after {self.cfg.startup_timeout_s:.0f} s: {names}; "
                    f"logs in {self.log_dir}"
                )
            if pending:
                time.sleep(0.25)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM in reverse start order, then SIGKILL whatever is left."""
        if self._stopping:
            return
        self._stopping = True
        for child in reversed(self.children):
            proc = child.process
            if proc is None or proc.poll() is not None:
                continue
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
            # The child's own helpers (Triton's stubs) share its process group.
            _signal_group(proc, signal.SIGKILL)

    def restart_scheduler(
        self, policy: str, batching: str, extra_scheduler_args: str | None = None
    ) -> None:
        """Restarts only the scheduler with another policy or batching mode.

        Benchmarks compare policies on the same Triton and workers: restarting
        Triton takes far longer, and the workers re-register by themselves once
        a heartbeat finds the new scheduler does not know them.
        """
        extra = (
            self.cfg.extra_scheduler_args if extra_scheduler_args is None else extra_scheduler_args
        )
        self.cfg = dataclasses.replace(
            self.cfg, policy=policy, batching=batching, extra_scheduler_args=extra
        )
        fresh = {c.name: c for c in plan(self.cfg)}["scheduler"]
        child = next(c for c in self.children if c.name == "scheduler")
        proc = child.process
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        child.argv = fresh.argv
        assert child.log_path is not None
        with child.log_path.open("ab") as log:
            child.process = subprocess.Popen(
                child.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self._wait_for([child])

    def alive(self) -> list[str]:
        return [c.name for c in self.children if c.process and c.process.poll() is None]

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _run_dir() -> Path:
    from shortline.common.paths import run_dir

    return run_dir()


def _default_log_dir() -> Path:
    return _run_dir() / "logs"
