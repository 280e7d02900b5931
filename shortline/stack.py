"""The local stack: every service as a child process on 127.0.0.1.

What ``make run`` starts. The launcher owns its children: it puts each in its
own session (so a terminal's Ctrl-C reaches only the launcher), waits until
every health check says SERVING, and then supervises them: a child that exits
on its own is restarted after a backoff (``RESTART_MIN_S`` doubling to
``RESTART_MAX_S``, back to the minimum once it has served for
``HEALTHY_RESET_S``), with one line naming the service, how it ended, the delay
and its log, and another when it serves again. One crash is one restart, not an
outage: the other services keep running, and the scheduler resumes the jobs of
a lost worker elsewhere.

The OpenAI-compatible gateway (``shortline gateway serve``) starts last, in
front of the scheduler's public port, and is ready when its ``/ready`` answers
200 (the scheduler SERVING behind it); ``--no-gateway`` leaves it out.

Only the launcher's own SIGINT or SIGTERM stops everything, in drain order
(``stack_plan.stop_stages``): the scheduler first (with the gateway, whose
requests in flight are the scheduler's to finish), which drains (admits nothing
new, lets admitted requests finish within its grace), then the workers, the
predictor and Triton; each is killed if it outlives its stop timeout, so no
process is left behind and every port is released.

With ``tls`` (``shortline up --tls``) every listener speaks TLS and the
services call each other with mutual TLS: the launcher makes a development CA
and one certificate per service in ``certs_dir`` (``shortline certs``) and a
tokens file with one token for tenant ``dev``, whose clear text goes to
``token`` beside it (mode 0600; printed as a path, never as the token). The
gateway then serves HTTPS with its own certificate and verifies the scheduler
with the CA; it holds no token (HTTP clients send theirs as a bearer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
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
    stop_stages,
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
    "http_ready",
    "plan",
    "port_is_free",
    "triton_ready",
]

# Restart backoff: the first restart after RESTART_MIN_S, each next one twice as late,
# at most RESTART_MAX_S; back to the minimum once a child has served HEALTHY_RESET_S.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
HEALTHY_RESET_S = 30.0
# How often the supervisor looks at its children.
SUPERVISE_POLL_S = 0.2
# How long a restart waits for the ports of the instance that died (Triton's server
# outlives its wrapper for a few seconds while it unloads) before trying anyway.
PORT_WAIT_S = 30.0


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


def http_ready(url: str, ca_file: Path | None = None, timeout: float = 1.0) -> bool:
    """``url`` answers 200 (the gateway's /ready: it and the scheduler behind it serve);
    HTTPS verified against ``ca_file``. Never through a proxy from the environment: the
    stack is on this machine."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):  # refused, timed out, an HTTP error status, a TLS failure
        return False


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


def how_it_ended(returncode: int) -> str:
    """``exited with code 1``, ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Watch:
    """The supervisor's record of one child."""

    backoff: float = RESTART_MIN_S
    restarts: int = 0
    restart_at: float | None = None  # it died: when to start it again
    died_at: float = 0.0
    port_deadline: float = 0.0
    awaiting_health: bool = False  # restarted, not SERVING yet
    served_at: float | None = None  # when the current instance was seen SERVING


class Stack:
    """Starts, supervises and stops the children; usable as a context manager in tests.

    ``supervise`` (the default) restarts a child that exits on its own; ``say``
    receives each line the supervisor has for the operator (default: stderr).
    """

    def __init__(
        self,
        cfg: StackConfig,
        *,
        supervise: bool = True,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.cfg = cfg
        self.children = plan(cfg)
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else _default_log_dir()
        self.supervise = supervise
        self.say = say
        self._stopping = False
        self._health_tls: tls_mod.TlsMaterial | None = None
        self._env = {**os.environ, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}
        self._watch = {c.name: _Watch() for c in self.children}
        # Guards each child's process against the supervisor and restart_scheduler.
        self._lock = threading.Lock()
        self._paused: set[str] = set()  # being restarted on purpose: not supervised
        self._halt = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._stopping_now: list[Child] = []  # the stage a stop is waiting for

    @property
    def scheduler_address(self) -> str:
        return f"{self.cfg.host}:{self.cfg.scheduler_port}"

    @property
    def gateway_url(self) -> str | None:
        """The OpenAI API's base URL (``.../v1``, what the ``openai`` client takes); None
        with ``--no-gateway``."""
        return self.cfg.gateway_url() if self.cfg.gateway else None

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
            names = certs.identities(
                self.cfg.workers, [LAUNCHER, *(["gateway"] if self.cfg.gateway else [])]
            )
            written = certs.dev_credentials(d, names, tokens, token)
        except certs.CertsError as exc:
            raise StackError(str(exc)) from exc
        self._health_tls = tls_mod.client_material(
            str(d / "ca.pem"), str(d / f"{LAUNCHER}.pem"), str(d / f"{LAUNCHER}.key")
        )
        return written

    # ---- start ---------------------------------------------------------------

    def start(self) -> None:
        check_ports(self.cfg)
        if self.cfg.tls and self._health_tls is None:
            self.prepare_credentials()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for child in self.children:
                child.log_path = self.log_dir / f"{child.name}.log"
                self._spawn(child, fresh=True)
                if child.name in ("triton", "predictor"):
                    # Workers report NOT_SERVING until Triton is ready, and a scheduler
                    # that finds no predictor at start (it lists its heads) predicts by
                    # fallback until its channel's reconnect backoff ends: wait for both.
                    self._wait_for([child])
            self._wait_for(self.children)
        except BaseException:
            self.stop()
            raise
        now = time.monotonic()
        for watch in self._watch.values():
            watch.served_at = now
        if self.supervise:
            self._supervisor = threading.Thread(
                target=self._supervise, name="shortline-supervisor", daemon=True
            )
            self._supervisor.start()

    def _spawn(self, child: Child, *, fresh: bool = False) -> None:
        """Starts ``child``, its output to its log (truncated at the first start,
        appended to after a restart)."""
        assert child.log_path is not None
        with child.log_path.open("wb" if fresh else "ab") as log:
            child.process = subprocess.Popen(
                child.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,
            )

    def healthy(self, child: Child) -> bool:
        if child.health_url is not None:
            ca = self.cfg.certs_path() / "ca.pem" if self.cfg.tls else None
            return http_ready(child.health_url, ca)
        if child.health_address is None:
            return triton_ready(self.cfg.host, self.cfg.triton_grpc_port)
        return grpc_serving(child.health_address, material=self._health_tls)

    def _wait_for(self, children: Sequence[Child]) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        pending = list(children)
        while pending:
            for child in list(pending):
                assert child.process is not None
                if child.process.poll() is not None:
                    raise StackError(
                        f"{child.name} {how_it_ended(child.process.returncode)} during "
                        f"start-up; see {child.log_path}"
                    )
                if self.healthy(child):
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StackError(
                    f"not SERVING after {self.cfg.startup_timeout_s:.0f} s: {names}; "
                    f"logs in {self.log_dir}"
                )
            if pending:
                time.sleep(0.25)

    # ---- supervision ---------------------------------------------------------

    def _supervise(self) -> None:
        while not self._halt.wait(SUPERVISE_POLL_S):
            for child in self.children:
                if self._halt.is_set():
                    return
                try:
                    self._look_after(child)
                except Exception as exc:  # the supervisor must outlive any one failure
                    self.say(f"shortline up: supervising {child.name} failed: {exc!r}")

    def _look_after(self, child: Child) -> None:
        """One look at ``child``: note a death, restart when due, report it SERVING."""
        watch = self._watch[child.name]
        now = time.monotonic()
        with self._lock:
            if self._stopping or child.name in self._paused:
                return
            proc = child.process
            if proc is None:
                return
            code = proc.poll()
            if code is not None and watch.restart_at is None:
                self._schedule_restart(child, watch, code, now)
                return
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    self._restart(child, watch, now)
                return
        if watch.awaiting_health and self.healthy(child):
            watch.awaiting_health = False
            watch.served_at = time.monotonic()
            self.say(
                f"shortline up: {child.name} is SERVING again "
                f"({watch.served_at - watch.died_at:.1f} s after it stopped)"
            )
        elif (
            watch.served_at is not None
            and watch.backoff > RESTART_MIN_S
            and now - watch.served_at >= HEALTHY_RESET_S
        ):
            watch.backoff = RESTART_MIN_S  # it has served a while: the next crash is news

    def _schedule_restart(self, child: Child, watch: _Watch, code: int, now: float) -> None:
        assert child.process is not None
        # Whatever it started in its session (Triton's stubs) goes with it.
        _signal_group(child.process, signal.SIGKILL)
        delay = watch.backoff
        watch.backoff = min(watch.backoff * 2, RESTART_MAX_S)
        watch.restart_at = now + delay
        watch.died_at = now
        watch.port_deadline = now + PORT_WAIT_S
        watch.awaiting_health = False
        watch.served_at = None
        self.say(
            f"shortline up: {child.name} {how_it_ended(code)}; restarting it in {delay:g} s "
            f"(restart {watch.restarts + 1}); its log: {child.log_path}"
        )

    def _restart(self, child: Child, watch: _Watch, now: float) -> None:
        busy = [p for p in child.ports if not port_is_free(self.cfg.host, p)]
        if busy and now < watch.port_deadline:
            watch.restart_at = now + SUPERVISE_POLL_S  # its last instance still holds them
            return
        assert child.log_path is not None
        with child.log_path.open("ab") as log:
            log.write(
                f"\n---- restarted by shortline up (restart {watch.restarts + 1}) ----\n".encode()
            )
        self._spawn(child)
        watch.restarts += 1
        watch.restart_at = None
        watch.awaiting_health = True

    def restarts(self, name: str) -> int:
        """How many times the supervisor restarted the child ``name``."""
        return self._watch[name].restarts

    # ---- stop ----------------------------------------------------------------

    def stop(self, grace_s: float | None = None) -> None:
        """Stops every child in drain order (``stop_stages``): SIGTERM to a stage, then
        SIGKILL to whatever outlives its stop timeout (``grace_s`` if given)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._halt.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=10)
        for stage in stop_stages(self.children):
            live = [c for c in stage if c.process is not None and c.process.poll() is None]
            self._stopping_now = live
            for child in live:
                assert child.process is not None
                _signal_group(child.process, signal.SIGTERM)
            for child in live:
                assert child.process is not None
                timeout = child.stop_timeout_s if grace_s is None else grace_s
                if not _wait(child.process, timeout):
                    self.say(
                        f"shortline up: {child.name} did not stop in {timeout:g} s; killing it"
                    )
            for child in stage:
                if child.process is not None:
                    # The child's own helpers (Triton's stubs) share its process group.
                    _signal_group(child.process, signal.SIGKILL)
        self._stopping_now = []

    def hurry(self) -> None:
        """Asked again to stop while stopping: the stage being stopped gets SIGTERM
        again, which ends a drain at once."""
        for child in list(self._stopping_now):
            if child.process is not None and child.process.poll() is None:
                _signal_group(child.process, signal.SIGTERM)

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
        with self._lock:
            self._paused.add(child.name)
        try:
            proc = child.process
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                _wait(proc, child.stop_timeout_s)
            child.argv = fresh.argv
            self._spawn(child)
            self._wait_for([child])
        finally:
            with self._lock:
                self._watch[child.name] = _Watch(served_at=time.monotonic())
                self._paused.discard(child.name)

    def alive(self) -> list[str]:
        return [c.name for c in self.children if c.process and c.process.poll() is None]

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Waits for ``proc`` to exit; kills its group if it does not in ``timeout``."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        return False


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _default_log_dir() -> Path:
    return run_dir() / "logs"
