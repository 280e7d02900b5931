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
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shortline.common import tls as tls_mod
from shortline.common.paths import run_dir
from shortline.stack_plan import (
    LAUNCHER,
    Child,
    StackConfig,
    StackError,
    all_ports,
    check_ports,
    plan,
    port_is_free,
)

if TYPE_CHECKING:
    from shortline.client import ClientOptions

# The plan's names, for callers that only import the launcher.
__all__ = [
    "LAUNCHER",
    "Child",
    "Stack",
    "StackConfig",
    "StackError",
    "all_ports",
    "check_ports",
    "grpc_serving",
    "plan",
    "port_is_free",
    "triton_ready",
]


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


def _default_log_dir() -> Path:
    return run_dir() / "logs"
