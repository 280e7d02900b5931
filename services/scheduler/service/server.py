"""The scheduler's gRPC server (with health and reflection) and ``serve()``.

On SIGTERM the scheduler drains before it stops (``SchedulerServer.drain``):
health turns NOT_SERVING at once, a new request is refused with UNAVAILABLE (a
client retries on another scheduler) while retries of requests it holds still
attach, and admitted requests (running and queued) have ``drain_grace_s`` to
finish; those still unfinished then end with UNAVAILABLE naming the drain, so
no client stream is left hanging. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.service.clock import MonotonicClock
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.internal import SchedulerInternalServicer
from services.scheduler.service.journal import Journal, JournalError, journal_path
from services.scheduler.service.servicer import INTERNAL_SERVICE_NAME, SchedulerServicer
from services.scheduler.service.streams import Request
from services.scheduler.service.tenancy import (
    Tenancy,
    TenancyConfigError,
    TokensFileError,
    startup_policy,
)
from shortline.common import grpc_server, paths, prometheus, tls
from shortline.common.net import free_port
from shortline.common.outcomes import OutcomeLog, OutcomeLogError
from shortline.common.telemetry import setup_tracing
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name

# How often a drain looks whether every admitted request has ended.
DRAIN_POLL_S = 0.05


class DrainingServicer(SchedulerServicer):
    """The public API as served: what it refuses once the scheduler drains is
    ``SchedulerServicer.draining``'s (in its ``Generate``, so that no extra generator
    layer sits on every message of a stream)."""


class SchedulerServer:
    """Two gRPC servers (health and reflection on each) over one data plane: the
    public API on ``address``, the internal one on ``internal_address``."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.tls = tls.load(cfg)  # TlsConfigError names a bad file before anything starts
        # First: a bad tokens file, or an open port without one, refuses to start.
        tenancy = Tenancy(cfg.tokens_file)
        startup_policy(cfg, tenancy)
        log_path = Path(cfg.outcome_log) if cfg.outcome_log else paths.run_dir() / "outcomes.sqlite"
        # Private (0600), bounded, and in digest mode without prompt text; a bad
        # --outcome-log-prompts raises OutcomeLogError naming the flag before any file is made.
        self.outcome_log = OutcomeLog(
            log_path,
            prompts=cfg.outcome_log_prompts,
            max_rows=cfg.outcome_log_max_rows,
            max_age_s=cfg.outcome_log_max_age_days * 86400.0,
        )
        # Admissions, predictions and delivered text, for a restart after a crash; one
        # scheduler per file (JournalError names it).
        path = journal_path(cfg.journal, cfg.port, paths.run_dir())
        self.journal = Journal(path, MonotonicClock()) if path is not None else None
        self.servicer = DrainingServicer(cfg, self.outcome_log, tenancy, self.journal)
        self.address = f"{cfg.host}:{cfg.port}"
        # Public: TLS, never client certificates (tokens identify clients there).
        self.server, self.health = grpc_server.build_server(
            lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self.servicer, s),
            [SERVICE_NAME],
            self.address,
            max_message_bytes=cfg.max_message_bytes,
            max_workers_streams=cfg.max_concurrent_streams,
            credentials=tls.server_credentials(self.tls, internal=False),
        )
        self.internal = SchedulerInternalServicer(cfg, self.servicer.plane, self.tls.identity)
        internal_port = cfg.internal_port or free_port(cfg.internal_host)
        self.internal_address = f"{cfg.internal_host}:{internal_port}"
        self.servicer.internal_address = self.internal_address
        self.internal_server, self.internal_health = grpc_server.build_server(
            lambda s: internal_pb2_grpc.add_SchedulerInternalServiceServicer_to_server(
                self.internal, s
            ),
            [INTERNAL_SERVICE_NAME],
            self.internal_address,
            # Internal: mutual TLS with --tls-ca (only the CA's certificates may join).
            credentials=tls.server_credentials(self.tls, internal=True),
        )

    @property
    def plane(self) -> SchedulerService:
        """The data plane: the core, the worker pool, the requests."""
        return self.servicer.plane

    async def start(self) -> None:
        await self.internal_server.start()
        await self.server.start()
        self.plane.start()
        await grpc_server.set_serving(self.internal_health, [INTERNAL_SERVICE_NAME], True)
        await grpc_server.set_serving(self.health, [SERVICE_NAME], True)
        log.info(
            "scheduler on %s (internal %s): policy %s, batching %s, queue limit %d, "
            "predictor %s, log %s",
            self.address,
            self.internal_address,
            self.cfg.policy,
            self.cfg.batching,
            self.cfg.queue_limit,
            self.cfg.predictor or "none (fallback only)",
            self.outcome_log.path,
        )
        log.info("TLS %s", tls.describe(self.tls))
        log.info(
            "journal %s",
            self.journal.path if self.journal else "off: a crash loses the queue (--journal)",
        )

    def unfinished(self) -> list[Request]:
        """Admitted requests not ended yet (queued, awaiting prediction, running)."""
        return [j.attachment for j in self.plane.core if not j.terminal and j.attachment]

    async def drain(self, grace_s: float) -> None:
        """Stops admitting and gives admitted requests ``grace_s`` to end; the rest
        end UNAVAILABLE naming the drain (a client may retry the same id elsewhere)."""
        self.servicer.draining = True
        await grpc_server.set_serving(self.health, [SERVICE_NAME], False)
        await grpc_server.set_serving(self.internal_health, [INTERNAL_SERVICE_NAME], False)
        left = self.unfinished()
        log.info(
            "draining: no new requests; %d admitted ones have up to %g s to finish",
            len(left),
            grace_s,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while left and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
            left = self.unfinished()
        self.plane.interrupt(
            left, f"the scheduler drained for {grace_s:g} s and stopped before it finished"
        )
        if left:
            log.warning("drained: %d requests unfinished after %g s ended", len(left), grace_s)
        else:
            log.info("drained: every admitted request ended")

    async def stop(self, grace_s: float = 2.0) -> None:
        await grpc_server.set_serving(self.health, [SERVICE_NAME], False)
        await grpc_server.set_serving(self.internal_health, [INTERNAL_SERVICE_NAME], False)
        await self.server.stop(grace_s)
        await self.internal_server.stop(grace_s)
        await self.plane.close()
        await asyncio.to_thread(self.outcome_log.close)


async def serve(cfg: SchedulerConfig) -> None:
    setup_tracing("scheduler")
    try:
        server = SchedulerServer(cfg)
    except (TokensFileError, TenancyConfigError, OutcomeLogError, JournalError) as exc:
        raise SystemExit(f"scheduler: {exc}") from exc
    prometheus.start_metrics_server(cfg.metrics_port, cfg.host, metrics.REGISTRY)
    await server.start()

    async def on_stop() -> None:
        await server.internal_server.stop(1.0)
        await server.plane.close()

    await grpc_server.run_until_signal(
        server.server, on_stop=on_stop, on_drain=lambda: server.drain(cfg.drain_grace_s)
    )
    await asyncio.to_thread(server.outcome_log.close)
