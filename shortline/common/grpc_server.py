"""Building and running a service's grpc.aio server the same way everywhere.

Every server registers the standard health service (so Kubernetes probes and
``grpc_health_probe`` work) and server reflection (so ``grpcurl`` works), and
stops gracefully on SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AioHealthServicer
from grpc_reflection.v1alpha import reflection

from shortline.common.rpc_errors import DefinedStatus

log = logging.getLogger(__name__)

# gRPC's own default (4 MiB); services that take user text set a smaller one.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class PortInUseError(RuntimeError):
    """The listen address is taken; the message names it."""


def build_server(
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: Iterable[str],
    address: str,
    *,
    max_workers_streams: int = 1000,
    credentials: grpc.ServerCredentials | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, AioHealthServicer]:
    """Creates the server with health and reflection, bound to ``address``.

    With ``credentials`` (``tls.server_credentials``) the port speaks TLS only;
    a message above ``max_message_bytes`` is refused by gRPC with
    RESOURCE_EXHAUSTED before any servicer sees it. A message that does not
    parse, or a servicer's unexpected exception, gets a defined status in one
    log line (``rpc_errors.DefinedStatus``), never UNKNOWN with a traceback.

    ``service_names`` are the fully qualified services (``DESCRIPTOR.services_by_name[...]
    .full_name``). Health answers NOT_FOUND for them until :func:`set_serving` is awaited:
    call ``set_serving(..., False)`` right after ``start()`` and ``True`` once ready.
    """
    server = grpc.aio.server(
        # Every RPC (health and reflection too) answers a defined status for any input.
        interceptors=[DefinedStatus()],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", max_workers_streams),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    add_servicers(server)
    health_servicer = AioHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise PortInUseError(f"cannot listen on {address}: address already in use") from exc
    if port == 0:
        raise PortInUseError(f"cannot listen on {address}: address already in use")
    return server, health_servicer


async def set_serving(
    health_servicer: AioHealthServicer, service_names: Iterable[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in [*service_names, ""]:
        await health_servicer.set(name, status)


async def run_until_signal(
    server: grpc.aio.Server,
    *,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_seconds: float = 5.0,
    on_drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops: in-flight calls get ``grace_seconds``.

    With ``on_drain`` the first signal runs it before stopping (the service stops
    taking work and lets what runs finish, within its own grace); a second signal
    cuts the drain short, so an operator who means "now" is obeyed.
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, signalled.set)
    await signalled.wait()
    signalled.clear()
    if on_drain is not None:
        log.info("draining")
        drain = asyncio.ensure_future(on_drain())
        again = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            log.warning("signalled again while draining: stopping now")
            drain.cancel()
        again.cancel()
        try:
            await drain
        except asyncio.CancelledError:
            pass
        except Exception:  # stopping must still happen
            log.exception("drain failed; stopping")
    log.info("stopping")
    if on_stop is not None:
        await on_stop()
    await server.stop(grace_seconds)


def is_address_in_use(exc: OSError) -> bool:
    return exc.errno == errno.EADDRINUSE
