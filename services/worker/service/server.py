"""The worker's gRPC server and its lifecycle: start, Triton health watch, scheduler
membership, stop.

It owns the :class:`~services.worker.service.servicer.WorkerServicer` and
hands registration only what a heartbeat needs (a status callable), so
``registration.py`` does not know this module.

On SIGTERM the worker drains (``WorkerServer.drain``): health and heartbeats say
not serving at once (so the scheduler places nothing more here), a new Execute
gets UNAVAILABLE, running jobs have ``drain_grace_s`` to finish, and those still
running then are handed back: their Execute streams end with a PREEMPTED result
after exactly the text they streamed, and the scheduler resumes them elsewhere
from that text.

Which models it serves (``--models``): an explicit list as given, or with ``auto``
what its Triton lists as READY in its repository index, read at start and again
whenever Triton comes back after being unreachable (it may return with other
models; the worker then registers again). Until Triton has answered, an auto
worker announces the models of ``--model-settings`` and reports itself not
serving. A configuration that cannot work stops the worker at start
(:class:`WorkerStartError`, naming the model and the flag): a served model with
no ``--model-settings``, or a scheduler refusing the registration (a length model
with no predictor head).

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
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import cast

import grpc

from services.worker.config import WorkerConfig
from services.worker.prompts import FORMATS, ModelSpec, chat_models, model_limits
from services.worker.service.registration import (
    Membership,
    RegistrationRefused,
    WorkerStatus,
    keep_registered,
)
from services.worker.service.servicer import WorkerServicer
from services.worker.service.slots import Execution
from services.worker.service.triton_client import TritonClient, TritonUnavailable
from shortline.common import grpc_server, tls
from shortline.common.limits import max_message_bytes
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# While Triton is not ready, readiness is checked this often (at most): a restarted
# Triton is noticed within it plus the client's bounded reconnect backoff.
NOT_READY_POLL_S = 0.25

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name

# How often a drain looks whether every running job has ended.
DRAIN_POLL_S = 0.05
# How long handed-back jobs get to end their streams (a Triton step, a message).
HAND_OFF_WAIT_S = 5.0
# How long stop waits for its background tasks after cancelling them.
TASK_STOP_S = 2.0
# How long start waits for the scheduler's first answer (RegisterWorker's own timeout
# is 5 s): a refusal then stops the start; no answer leaves it to retry in the background.
FIRST_REGISTRATION_S = 6.0


class WorkerStartError(Exception):
    """The worker cannot serve as configured; the message names the model and the flag."""


class DrainingServicer(WorkerServicer):
    """The WorkerService, refusing new jobs once the worker drains, and knowing the
    jobs it runs (by id) so that a drain can hand them back."""

    draining = False

    def __init__(self, config: WorkerConfig, triton: TritonClient, worker_id: str) -> None:
        super().__init__(config, triton, worker_id)
        self.job_ids: set[str] = set()

    async def Execute(
        self, request: worker_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.ExecuteResponse]:
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"worker {self.worker_id} is draining (shutting down) and takes no new job",
            )
        self.job_ids.add(request.job_id)
        items = cast(
            AsyncGenerator[worker_pb2.ExecuteResponse, None], super().Execute(request, context)
        )
        try:
            async with contextlib.aclosing(items):
                async for item in items:
                    yield item
        finally:
            self.job_ids.discard(request.job_id)

    def hand_off(self) -> list[Execution]:
        """Ends every running job's Triton stream; each Execute then ends with a
        PREEMPTED result after exactly the text it streamed (as for ``Preempt``)."""
        handed = []
        for job_id in list(self.job_ids):
            execution = self.slots.get(job_id)
            if execution is None or execution.stop_reason is not None:
                continue
            execution.stop_reason = common_pb2.FINISH_REASON_PREEMPTED
            if execution.stream is not None:
                execution.stream.cancel()
            handed.append(execution)
        return handed


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
        self.servicer = DrainingServicer(config, self.triton, self.worker_id)
        self.triton.on_unreachable = self._triton_unreachable
        self._recheck = asyncio.Event()  # check Triton now (a request found it unreachable)
        self._beat = asyncio.Event()  # heartbeat now (serving changed)
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
        self._heads = config.head_targets()
        # auto: Triton's index is still to be read (at start, and after Triton was away).
        self._index_due = config.auto
        self._serve(config.settings() if config.auto else config.explicit_models())
        self._registration: asyncio.Task[None] | None = None
        self._membership: Membership | None = None
        self._tried = asyncio.Event()
        # Set with the scheduler's message when it refused this worker for good.
        self.refusal: str | None = None
        self.refused = asyncio.Event()  # set with ``refusal``: the process should exit

    def _serve(self, specs: dict[str, ModelSpec]) -> None:
        """Serves ``specs`` from now: the servicer's models and the limits registered,
        each with its head target (``--length-models``; none: the scheduler's default)."""
        self.servicer.models = dict(specs)
        self.servicer.limits = tuple(
            replace(limits, length_model=self._heads.get(limits.model, ""))
            for limits in model_limits(specs, self.config.max_prompt_chars)
        )

    async def _read_index(self, at_start: bool) -> bool:
        """Serves what Triton lists as READY (``--models auto``); True when that changed
        what is registered. A served model without ``--model-settings`` stops the worker
        at start; later (Triton restarted with another model) it is left out, logged,
        as a running worker must not die under the jobs it runs."""
        try:
            names = await self.triton.ready_models()
        except TritonUnavailable as exc:
            log.warning("%s; will ask again", exc)
            return False
        self._index_due = False
        settings = self.config.settings()
        missing = [name for name in names if name not in settings]
        problem = None
        if missing:
            problem = (
                f"Triton at {self.triton.url} serves {', '.join(missing)} but --model-settings "
                f"(SHORTLINE_WORKER_MODEL_SETTINGS) has no NAME=FORMAT:MAX_TOKENS for it "
                f"(formats: {', '.join(FORMATS)}); add it, or give --models explicitly"
            )
        elif not names:
            problem = f"Triton at {self.triton.url} serves no READY model"
        if problem is not None:
            if at_start:
                raise WorkerStartError(problem)
            log.error("%s; serving the rest", problem)
        specs = {name: settings[name] for name in names if name in settings}
        if not specs:
            return False
        changed = specs != self.servicer.models or self._registered_guess()
        self._serve(specs)
        log.info("Triton at %s serves %s", self.triton.url, ", ".join(sorted(specs)))
        return changed

    def _registered_guess(self) -> bool:
        """Whether the registration running announces a guess (Triton had not answered)."""
        return self._membership is not None and not self._membership.final

    def _register(self) -> None:
        """(Re)starts joining the scheduler with the models served now."""
        if not self.config.scheduler:
            return
        if self._registration is not None:
            self._registration.cancel()  # stop() still waits for it (in _tasks)
        self._membership = Membership(
            worker_id=self.worker_id,
            address=self.config.advertise_address or self.address,
            slots=self.servicer.slots.total,
            models=tuple(sorted(self.servicer.models)),
            limits=self.servicer.limits,
            chat=chat_models(self.servicer.models),
            final=not self._index_due,
        )
        self._tried.clear()
        task = asyncio.create_task(
            keep_registered(
                self.config.scheduler,
                self._membership,
                self.status,
                self.tls,
                self._beat,
                self._tried,
            )
        )
        task.add_done_callback(self._registration_ended)
        self._registration = task
        self._tasks.append(task)

    def _registration_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, RegistrationRefused):
            self.refusal = str(exc)  # logged where it was raised
            self.refused.set()
        elif exc is not None:
            log.error("registration with the scheduler ended: %r", exc)

    async def start(self) -> None:
        """Starts serving; raises WorkerStartError (after stopping) when the worker
        cannot serve as configured."""
        await self.server.start()
        try:
            await self._check_triton(at_start=True)
            self._tasks.append(asyncio.create_task(self._watch_triton()))
            self._register()
            if self._registration is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FIRST_REGISTRATION_S):
                        await self._tried.wait()
                await asyncio.sleep(0)  # a refused registration's task ends now
                if self.refusal is not None:
                    raise WorkerStartError(self.refusal)
        except WorkerStartError as exc:
            log.error("worker cannot start: %s", exc)
            await self.stop(0)
            raise
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

    async def _check_triton(self, at_start: bool = False) -> None:
        if self.servicer.draining:
            return  # not serving until it exits, whatever Triton says
        ready = await self.triton.is_ready(timeout_s=max(0.2, self.config.health_poll_s))
        if not ready:
            self._index_due = self.config.auto  # it may come back with other models
        elif self._index_due and await self._read_index(at_start) and not at_start:
            self._register()  # before it says serving: no job lands on the old membership
        if ready != self.servicer.serving:
            log.log(
                logging.INFO if ready else logging.WARNING,
                "Triton at %s is %s",
                self.triton.url,
                "ready" if ready else "unreachable or not ready",
            )
            self._beat.set()
        self.servicer.serving = ready
        await grpc_server.set_serving(self.health, [SERVICE_NAME], ready)

    def _triton_unreachable(self) -> None:
        """A request found Triton unreachable: not serving from now (so neither the next
        heartbeat nor a new Execute says otherwise), confirmed by a check at once."""
        if self.servicer.serving:
            log.warning("Triton at %s became unreachable during a request", self.triton.url)
            self.servicer.serving = False
            self._beat.set()
        self._recheck.set()

    async def _watch_triton(self) -> None:
        while True:
            poll = self.config.health_poll_s
            if not self.servicer.serving:
                poll = min(poll, NOT_READY_POLL_S)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel
            # that arrives as the event is set, and the watch would then never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await self._recheck.wait()
            self._recheck.clear()
            try:
                await self._check_triton()
            except Exception:
                log.exception("health check failed")

    async def drain(self, grace_s: float) -> None:
        """Takes no new job and tells the scheduler so (health and the next heartbeat,
        sent at once); running jobs get ``grace_s`` to finish, the rest are handed back
        to resume elsewhere from the text they streamed."""
        servicer = self.servicer
        servicer.draining = True
        servicer.serving = False
        self._beat.set()
        await grpc_server.set_serving(self.health, [SERVICE_NAME], False)
        log.info(
            "draining: no new jobs; %d running have up to %g s to finish",
            servicer.slots.used,
            grace_s,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while servicer.slots.used and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        handed = servicer.hand_off()
        if handed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(e.done.wait() for e in handed)), HAND_OFF_WAIT_S
                )
            log.warning(
                "drained: %d jobs still running after %g s handed back to the scheduler",
                len(handed),
                grace_s,
            )
        else:
            log.info("drained: every running job finished")

    async def stop(self, grace_s: float = 2.0) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that swallows its cancel must not keep the worker up.
            _, late = await asyncio.wait(self._tasks, timeout=TASK_STOP_S)
            for task in late:
                name = getattr(task.get_coro(), "__qualname__", task.get_name())
                log.warning("%s did not end within %g s of its cancel", name, TASK_STOP_S)
        self._tasks.clear()
        stopping = asyncio.create_task(self.server.stop(grace_s))
        # The delta streams end once the jobs whose deltas they carry have (or the grace
        # is over), not after the grace: they are open for as long as a scheduler is.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.servicer.slots.used and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        self.servicer.deltas.close_all()
        await stopping
        await self.triton.close()
