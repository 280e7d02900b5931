"""Joining a scheduler on its internal port: RegisterWorker, then Heartbeat at the
interval it asks for.

The worker keeps serving when the scheduler is down and registers again when
a heartbeat says the scheduler does not know it (e.g. after a restart).

A heartbeat carries whether the worker can serve (its Triton is ready): the
scheduler keeps a not-serving worker registered but places nothing on it. The
first heartbeat follows the registration at once, and ``wake`` (set when the
serving state changes) sends the next one at once, so the scheduler stops and
resumes dispatching within a round trip instead of a heartbeat interval.

A registration refused with FAILED_PRECONDITION (a model pool that serves other
models, a length model with no predictor head) is a configuration error that
retrying cannot fix: ``keep_registered`` raises :class:`RegistrationRefused`
with the scheduler's message, unless the membership is provisional (an auto
worker whose Triton has not listed its models yet: the real list may fit).

This module knows nothing of the server that runs it: it is given the
worker's fixed :class:`Membership` and a callable that returns its current
:class:`WorkerStatus` at each heartbeat.

Usage::

    status = lambda: WorkerStatus(slots_used=slots.used, serving=serving)
    task = asyncio.create_task(
        keep_registered("sched:50051", Membership("w1", "w1:50071", 8, ("replay",)), status)
    )
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from shortline.common import tls
from shortline.common.limits import ModelLimits
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2

log = logging.getLogger(__name__)

RETRY_S = 1.0


@dataclass(frozen=True)
class Membership:
    """What RegisterWorker announces; fixed for the worker's life."""

    worker_id: str
    address: str
    slots: int
    models: tuple[str, ...]
    # Per served model; the scheduler refuses requests outside them before Accepted.
    limits: tuple[ModelLimits, ...] = ()
    # The models whose chat template it applies to messages (``ModelLimits.chat``).
    chat: frozenset[str] = frozenset()
    # False: a guess (Triton has not listed its models yet), so a refusal is retried.
    final: bool = True


class RegistrationRefused(Exception):
    """The scheduler refused this worker's registration for good (its message)."""


@dataclass(frozen=True)
class WorkerStatus:
    """What each Heartbeat reports."""

    slots_used: int
    serving: bool


def advertised(membership: Membership) -> list[scheduler_pb2.ModelLimits]:
    """The limits sent at registration, each saying whether chat messages are formatted."""
    out = []
    for m in membership.limits:
        message = m.to_proto(scheduler_pb2.ModelLimits)
        message.chat = m.model in membership.chat
        out.append(message)
    return out


async def keep_registered(
    scheduler: str,
    membership: Membership,
    status: Callable[[], WorkerStatus],
    material: tls.TlsMaterial | None = None,
    wake: asyncio.Event | None = None,
    tried: asyncio.Event | None = None,
) -> None:
    """Runs until cancelled, or raises RegistrationRefused. With ``material`` the
    channel is TLS, presenting the worker's certificate (whose name the scheduler
    requires to be the worker id); setting ``wake`` sends the next heartbeat now;
    ``tried`` is set once the first registration has been answered or has failed."""
    async with tls.aio_channel(scheduler, material or tls.TlsMaterial()) as channel:
        stub = internal_pb2_grpc.SchedulerInternalServiceStub(channel)
        registered = False
        interval = RETRY_S
        warned = False
        while True:
            try:
                if not registered:
                    reply = await stub.RegisterWorker(
                        scheduler_pb2.RegisterWorkerRequest(
                            worker_id=membership.worker_id,
                            address=membership.address,
                            slots=membership.slots,
                            models=list(membership.models),
                            limits=advertised(membership),
                        ),
                        timeout=5.0,
                    )
                    interval = reply.heartbeat_interval_seconds or RETRY_S
                    registered = True
                    if tried is not None:
                        tried.set()
                    warned = False
                    log.info("registered with scheduler %s as %s", scheduler, membership.worker_id)
                    continue  # the first heartbeat says at once whether it can serve
                else:
                    now = status()
                    beat = await stub.Heartbeat(
                        scheduler_pb2.HeartbeatRequest(
                            worker_id=membership.worker_id,
                            slots_used=now.slots_used,
                            serving=now.serving,
                        ),
                        timeout=max(1.0, interval),
                    )
                    if not beat.known:
                        log.info("scheduler %s forgot this worker; registering again", scheduler)
                        registered = False
                        continue
            except grpc.aio.AioRpcError as exc:
                refused = not registered and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                if refused and membership.final:
                    log.error("scheduler %s refused this worker: %s", scheduler, exc.details())
                    if tried is not None:
                        tried.set()
                    raise RegistrationRefused(
                        f"scheduler {scheduler} refused worker {membership.worker_id}: "
                        f"{exc.details()}"
                    ) from exc
                if tried is not None:
                    tried.set()
                if not warned:
                    log.warning(
                        "scheduler %s: %s %s (will keep trying)",
                        scheduler,
                        exc.code().name,
                        exc.details(),
                    )
                    warned = True
                registered = False
                interval = RETRY_S
            await _pause(interval, wake)


async def _pause(interval: float, wake: asyncio.Event | None) -> None:
    """Until the next heartbeat: ``interval``, or less when ``wake`` is set."""
    if wake is None:
        await asyncio.sleep(interval)
        return
    # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
    # arrives as ``wake`` is set, and this loop would then never end.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(interval):
            await wake.wait()
    wake.clear()
