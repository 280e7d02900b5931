"""What ``shortline up`` runs: the stack's configuration, its ports and the
command line of every child, in start order (``plan``).

Pure description, no processes: ``stack.py`` starts, watches and stops what
this plans, so a test or the benchmark can read a plan without running it.
Each child also says which ports it holds (a restart waits until they are free)
and how long it may take to stop (the drain grace, for the scheduler and workers);
``stop_stages`` is the order of a stop: the scheduler first, so that it drains
while the workers, the predictor and Triton still serve its running requests.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from services.scheduler.core.policies import DEFAULT_POLICY
from shortline.common.net import free_ports
from shortline.common.paths import run_dir

# The launcher's own certificate: its health checks reach services with mutual TLS.
LAUNCHER = "launcher"

# Beyond a service's drain grace, how long it may take to stop before it is killed.
STOP_MARGIN_S = 10.0
# How long the predictor and Triton may take to stop (Triton: its models unloading).
STOP_TIMEOUT_S = 30.0


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
    gateway: bool = dataclasses.field(
        default=True,
        metadata={"help": "start the OpenAI-compatible HTTP gateway in front of the scheduler"},
    )
    gateway_port: int = dataclasses.field(
        default=8000, metadata={"help": "the gateway's HTTP port (the OpenAI API's base URL)"}
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
    extra_worker_args: str = dataclasses.field(
        default="", metadata={"help": "extra flags passed to every `shortline worker serve`"}
    )
    extra_predictor_args: str = dataclasses.field(
        default="", metadata={"help": "extra flags passed to `shortline predictor serve`"}
    )
    versions_dir: str = dataclasses.field(
        default="",
        metadata={
            "help": "the predictor's head versions folder (default "
            "$SHORTLINE_PREDICTOR_VERSIONS_DIR, else <run dir>/predictor/versions, "
            "where `shortline predictor train --from-log|canary|promote|rollback` write by "
            "default: a rollout on this machine reaches this stack's predictor)"
        },
    )
    triton_models: str = dataclasses.field(
        default="", metadata={"help": "models Triton loads, comma-separated (default: all)"}
    )
    drain_grace_s: float = dataclasses.field(
        default=20.0,
        metadata={
            "help": "on stop: how long the scheduler, then each worker, may drain (finish "
            "running requests, taking no new ones) before what is left is ended"
        },
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

    def versions_path(self) -> Path:
        """The predictor's versions folder: the one the rollout commands default to, so
        ``shortline predictor promote`` on this machine reaches the stack; it outlives the
        stack (a restarted predictor comes back on the promoted version)."""
        if self.versions_dir:
            return Path(self.versions_dir)
        from services.predictor.config import default_versions_dir

        return Path(default_versions_dir())

    def gateway_url(self, path: str = "/v1") -> str:
        """The gateway's URL at ``path``: ``/v1`` is the base URL the ``openai`` client takes;
        HTTPS with ``tls``, where the gateway serves with its own certificate."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.gateway_port}{path}"

    def certs_path(self) -> Path:
        return Path(self.certs_dir) if self.certs_dir else run_dir() / "certs"

    def tokens_path(self) -> Path | None:
        if self.tokens_file:
            return Path(self.tokens_file)
        return run_dir() / "tokens.toml" if self.tls else None

    def token_path(self) -> Path | None:
        """Where the development token is in clear (beside the tokens file)."""
        tokens = self.tokens_path()
        return None if tokens is None else tokens.with_name("token")


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    health_address: str | None  # gRPC health endpoint; None: checked otherwise
    # An HTTP endpoint that answers 200 when ready (the gateway's /ready): checked instead.
    health_url: str | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # Ports it listens on: a restart waits until the last instance let them go.
    ports: tuple[int, ...] = ()
    # From SIGTERM to exit at most (its drain included); then it is killed.
    stop_timeout_s: float = STOP_TIMEOUT_S


def stop_stages(children: Sequence[Child]) -> list[list[Child]]:
    """The order of a stop, in stages (a stage's children stop together): the
    scheduler drains first while everything it uses still serves, then the
    workers (then idle), the predictor and Triton. The gateway stops with the
    scheduler: it takes no new connection and waits for its requests in flight,
    which are the scheduler's admitted requests that its drain finishes (a stage
    of its own before the scheduler would add a second wait of up to the grace)."""
    by_kind: dict[str, list[Child]] = {}
    for child in children:
        by_kind.setdefault(child.name.split("-")[0], []).append(child)
    order = [("gateway", "scheduler"), ("worker",), ("predictor",), ("triton",)]
    stages = [[c for kind in kinds for c in by_kind.pop(kind, [])] for kinds in order]
    return [stage for stage in stages if stage] + list(by_kind.values())


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
    if cfg.gateway:
        ports["gateway"] = cfg.gateway_port
    return ports


def free_config(taken: set[int] | None = None, **fields: object) -> StackConfig:
    """A config with ``fields`` whose every port is free now (and not in ``taken``, which
    gets them): for benchmarks and tests that run stacks side by side. The worker and
    metrics ports are ``base + i`` blocks, so a block is tried until all of it is free."""
    taken = set() if taken is None else taken
    for _ in range(50):
        singles = free_ports(8)
        base = singles[6]
        cfg = dataclasses.replace(
            StackConfig(**fields),  # type: ignore[arg-type]
            scheduler_port=singles[0],
            scheduler_internal_port=singles[1],
            predictor_port=singles[2],
            triton_grpc_port=singles[3],
            triton_http_port=singles[4],
            triton_metrics_port=singles[5],
            gateway_port=singles[7],
            worker_base_port=base + 1,
        )
        cfg = dataclasses.replace(cfg, metrics_base_port=base + 1 + cfg.workers)
        ports = set(all_ports(cfg).values())
        if not ports & taken and all(port_is_free(cfg.host, p) for p in ports):
            taken.update(ports)
            return cfg
    raise StackError("no free block of ports for a stack")


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
            ports=(cfg.triton_grpc_port, cfg.triton_http_port, cfg.triton_metrics_port),
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
                "--versions-dir",
                str(cfg.versions_path()),
                *_tls_args(cfg, "predictor"),
                *cfg.extra_predictor_args.split(),
            ],
            f"{h}:{cfg.predictor_port}",
            ports=(cfg.predictor_port, cfg.metrics_base_port + 1),
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
                # The scheduler caps the slots it uses per worker: the same K as the workers'.
                "--slots",
                str(cfg.slots),
                "--metrics-port",
                str(cfg.metrics_base_port),
                "--drain-grace-s",
                str(cfg.drain_grace_s),
                *_tls_args(cfg, "scheduler"),
                *(["--tokens-file", str(tokens)] if tokens is not None else []),
                *cfg.extra_scheduler_args.split(),
            ],
            f"{h}:{cfg.scheduler_port}",
            ports=(cfg.scheduler_port, cfg.scheduler_internal_port, cfg.metrics_base_port),
            stop_timeout_s=cfg.drain_grace_s + STOP_MARGIN_S,
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
                    "--drain-grace-s",
                    str(cfg.drain_grace_s),
                    *_tls_args(cfg, f"worker-{i + 1}"),
                    *cfg.extra_worker_args.split(),
                ],
                f"{h}:{cfg.worker_base_port + i}",
                ports=(cfg.worker_base_port + i, cfg.metrics_base_port + 2 + i),
                stop_timeout_s=cfg.drain_grace_s + STOP_MARGIN_S,
            )
        )
    if cfg.gateway:
        children.append(_gateway(cfg, exe))
    return children


def _gateway(cfg: StackConfig, exe: list[str]) -> Child:
    """The OpenAI-compatible gateway, in front of the scheduler's public port. With ``tls``
    it serves HTTPS with its own certificate and verifies the scheduler with the CA, as
    the SDK does; it gets no token: each HTTP client sends its own bearer, which the
    scheduler checks (a gateway token would admit any local process as tenant dev)."""
    return Child(
        "gateway",
        [
            *exe,
            "gateway",
            "serve",
            "--host",
            cfg.host,
            "--port",
            str(cfg.gateway_port),
            "--scheduler",
            f"{cfg.host}:{cfg.scheduler_port}",
            "--drain-grace-s",
            str(cfg.drain_grace_s),
            *_tls_args(cfg, "gateway"),
        ],
        None,
        health_url=cfg.gateway_url("/ready"),
        ports=(cfg.gateway_port,),
        # It waits for its requests in flight, which the scheduler's drain finishes.
        stop_timeout_s=cfg.drain_grace_s + STOP_MARGIN_S,
    )
