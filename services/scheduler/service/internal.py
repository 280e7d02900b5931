"""The internal API's servicer (``SchedulerInternalService``): workers join and beat,
operators read the pool with addresses.

Served on its own port, apart from the public one, so that a client with a
token can never register a worker. With mutual TLS a worker may register or
beat only under its certificate's name, so no one can take a registered id.
Without mutual TLS the port is trusted as a whole (it binds loopback by default).
"""

from __future__ import annotations

import grpc

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.servicer import stats_response
from services.scheduler.service.validation import validate_registration
from shortline.common import limits, tls
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2

# Other services' certificates: never a worker unless --worker-identities names them.
SERVICE_IDENTITIES = frozenset({"scheduler", "predictor"})


# A worker's id, address and models go into log lines, metric labels and status
# messages: bounded and printable, so no registration can flood or forge them.
MAX_WORKER_ID, MAX_ADDRESS, MAX_MODELS = 128, 256, 64


def _bad_names(request: scheduler_pb2.RegisterWorkerRequest) -> str | None:
    """What is wrong with the request's names (INVALID_ARGUMENT's message), or None."""
    fields = [("worker_id", request.worker_id, MAX_WORKER_ID)]
    fields.append(("address", request.address, MAX_ADDRESS))
    most_models = max(len(request.models), len(request.limits))
    if most_models > MAX_MODELS:
        return f"a worker serves at most {MAX_MODELS} models, got {most_models}"
    fields += [("models", m, limits.MAX_NAME_CHARS) for m in request.models]
    heads = [m.length_model for m in request.limits if m.length_model]
    fields += [("limits.length_model", h, limits.MAX_NAME_CHARS) for h in heads]
    for name, value, most in fields:
        if len(value) > most:
            return f"{name} must be at most {most} characters, got {len(value)}"
        if not value or not value.isprintable():
            return f"{name} must be printable and not empty"
    return None


class SchedulerInternalServicer(internal_pb2_grpc.SchedulerInternalServiceServicer):
    def __init__(
        self, cfg: SchedulerConfig, plane: SchedulerService, own_identity: str | None = None
    ) -> None:
        self.cfg = cfg
        self.plane = plane
        self.mutual_tls = cfg.mutual_tls
        self.allowed = tls.parse_names(cfg.worker_identities)
        self.reserved = (SERVICE_IDENTITIES | {own_identity or "scheduler"}) - self.allowed

    def _not_this_worker(self, worker_id: str, context: grpc.aio.ServicerContext) -> str | None:
        """Why the caller may not act as ``worker_id`` (PERMISSION_DENIED's message).

        With mutual TLS a worker id is its certificate's name: an impostor would need
        the real worker's key, not just its id (which GetStats used to show)."""
        if not self.mutual_tls:
            return None
        name = tls.peer_identity(context)
        wanted = worker_id[:64]
        if name is None:
            return f"worker {wanted!r}: this port needs a client certificate from the CA"
        if name != worker_id:
            return (
                f"certificate {name[:64]!r} may not act as worker {wanted!r}: a worker's id "
                "is its certificate's name"
            )
        if self.allowed and name not in self.allowed:
            return (
                f"certificate {name[:64]!r} is not a worker identity "
                f"(--worker-identities: {', '.join(sorted(self.allowed))})"
            )
        if name in self.reserved:
            return (
                f"certificate {name[:64]!r} belongs to a service, not a worker "
                "(list it in --worker-identities to allow it)"
            )
        return None

    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        denied = self._not_this_worker(request.worker_id, context)
        if denied is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
        problem = validate_registration(request) or _bad_names(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        mismatch = self.plane.workers.mismatch(request.worker_id, list(request.models))
        if mismatch is None:
            mismatch = await self._bad_heads(request)
        if mismatch is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        self.plane.workers.register(
            request.worker_id, request.address, request.slots, list(request.models), request.limits
        )
        return scheduler_pb2.RegisterWorkerResponse(
            heartbeat_interval_seconds=self.cfg.heartbeat_interval_s
        )

    async def _bad_heads(self, request: scheduler_pb2.RegisterWorkerRequest) -> str | None:
        """Why the worker's head targets cannot be used (FAILED_PRECONDITION's message).

        A target the predictor has no head for would make every request to the model
        fall back silently, and two workers mapping one model to different heads
        would make its predictions depend on placement: both are configuration
        errors the worker is told about at once (it stops rather than retrying).
        An empty target means the scheduler's --default-length-model (old workers)."""
        mapped = {m.model: m.length_model for m in request.limits if m.length_model}
        if not mapped:
            return None
        heads = await self.plane.head_targets()
        for model, target in sorted(mapped.items()):
            if heads is not None and target not in heads:
                return (
                    f"worker {request.worker_id}: model {model!r} maps to length model "
                    f"{target!r} (--length-models), which has no predictor head (heads: "
                    f"{', '.join(sorted(heads))}); map it to one of them, or leave the model "
                    f"out of --length-models for --default-length-model "
                    f"({self.cfg.default_length_model})"
                )
            for other in self.plane.workers:
                theirs = other.limits.get(model)
                if other.id == request.worker_id or theirs is None or not theirs.length_model:
                    continue
                if theirs.length_model != target:
                    return (
                        f"worker {request.worker_id}: model {model!r} maps to length model "
                        f"{target!r} (--length-models), but worker {other.id} maps it to "
                        f"{theirs.length_model!r}; a model pool uses one head per model"
                    )
        return None

    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        denied = self._not_this_worker(request.worker_id, context)
        if denied is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)
        return scheduler_pb2.HeartbeatResponse(
            known=self.plane.workers.heartbeat(request.worker_id, request.serving)
        )

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetStatsResponse:
        # With mutual TLS the handshake already required a certificate from the CA.
        return stats_response(self.plane, with_addresses=True)
