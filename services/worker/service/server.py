"""The worker's gRPC server and its lifecycle: start, Triton health watch, scheduler
membership, stop.

It owns the :class:`~services.worker.service.servicer.WorkerServicer` and
hands registration only what a heartbeat needs (a status callable), so
``registration.py`` does not know this module.

Usage::

    server = WorkerServer(WorkerConfig(slots=8, scheduler="127.0.0.1:50051"), "127.0.0.1:8001")
    await server.start()
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.worker.config import WorkerConfig
from services.worker.service.registration import Membership, WorkerStatus, keep_registered
from services.worker.service.servicer import WorkerServicer
from services.worker.service.triton_client import TritonClient
from shortline.common import grpc_server, tls
from shortline.common.limits import max_message_bytes
from shortline.common.net import free_port
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


class WorkerServer:
    """The gRPC server, its Triton health watch and (optionally) its scheduler membership."""

    def __init__(self, config: WorkerConfig, triton_url: str) -> None:
        self.config = config
        self.tls = tls.load(config)  # TlsConfigError names a bad file before anything starts
        self.port = config.port or free_port(config.host)
        self.address = f"{config.host}:{self.port}"
        # With TLS a worker is its certificate: the scheduler binds the id to its name.
        self.worker_id = (
            config.worker_id or self.tls.identity or f"worker-{config.host}-{self.port}"
        )
        if self.tls.mutual and self.worker_id != self.tls.identity:
            log.warning(
                "worker id %r is not the name of its certificate (%r): a scheduler with "
                "mutual TLS will refuse it",
                self.worker_id,
                self.tls.identity,
            )
        self.triton = TritonClient(triton_url)
        self.servicer = WorkerServicer(config, self.triton, self.worker_id)
        self.server, self.health = grpc_server.build_server(
            lambda s: worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, s),
            [SERVICE_NAME],
            self.address,
            max_message_bytes=max_message_bytes(config.max_prompt_chars),
            # With --tls-ca only the CA's certificates connect; the servicer then
            # accepts jobs only from --scheduler-identity.
            credentials=tls.server_credentials(self.tls, internal=True),
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.server.start()
        await self._check_triton()
        self._tasks.append(asyncio.create_task(self._watch_triton()))
        if self.config.scheduler:
            membership = Membership(
                worker_id=self.worker_id,
                address=self.config.advertise_address or self.address,
                slots=self.servicer.slots.total,
                models=tuple(sorted(self.servicer.models)),
                limits=self.servicer.limits,
            )
            self._tasks.append(
                asyncio.create_task(
                    keep_registered(self.config.scheduler, membership, self.status, self.tls)
                )
            )
        log.info(
            "worker %s on %s, %d slots, Triton %s (%s)",
            self.worker_id,
            self.address,
            self.config.slots,
            self.triton.url,
            "ready" if self.servicer.serving else "not ready",
        )
        log.info("TLS %s", tls.describe(self.tls))

    def status(self) -> WorkerStatus:
        """What a heartbeat reports: slots in use and whether Triton is ready."""
        return WorkerStatus(slots_used=self.servicer.slots.used, serving=self.servicer.serving)

    async def _check_triton(self) -> None:
        ready = await self.triton.is_ready(timeout_s=max(0.2, self.config.health_poll_s))
        if ready != self.servicer.serving:
            log.log(
                logging.INFO if ready else logging.WARNING,
                "Triton at %s is %s",
                self.triton.url,
                "ready" if ready else "unreachable or not ready",
            )
        self.servicer.serving = ready
        await grpc_server.set_serving(self.health, [SERVICE_NAME], ready)

    async def _watch_triton(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_poll_s)
            try:
                await self._check_triton()
            except Exception:
                log.exception("health check failed")

    async def stop(self, grace_s: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.server.stop(grace_s)
        await self.triton.close()
