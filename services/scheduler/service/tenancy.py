"""Who calls the public API, and which requests are theirs.

Every public RPC asks :meth:`Tenancy.tenant` first: with a tokens file a caller
is the tenant its bearer token names (``UNAUTHENTICATED`` without a known
one); without one, every caller is the one anonymous tenant and the scheduler
listens on loopback only (:func:`startup_policy`).

A request id belongs to its tenant: the core's job id is the scoped key
:func:`scoped_key` (tenant names never hold "/", so it is unambiguous), so
another tenant's id is simply not found. A reused id must be the same request:
each request keeps a fingerprint (one SHA-256 per field, not the prompt) and
:func:`differing_field` names the field a retry changed.
"""

from __future__ import annotations

import hashlib
import logging

import grpc

from services.scheduler.config import SchedulerConfig
from services.scheduler.core.admission import HintNotAllowedError, PriorityCapError
from shortline.common.auth import ANONYMOUS, Tenant, TokensFileError, TokenStore, bearer_token
from shortline.common.tls import is_loopback
from shortline.scheduler.v1 import scheduler_pb2

log = logging.getLogger(__name__)

SHOWN_ID_CHARS = 64

# The fields that make two GenerateRequests with one id the same request, in the
# order a difference is reported.
# "messages" last: a fingerprint journaled before chat (six digests) is read as one of
# a request without messages (``differing_field``).
FINGERPRINT_FIELDS = (
    "prompt",
    "model",
    "max_tokens",
    "sampling",
    "length_model",
    "priority",
    "messages",
    "length_hint",
)
Fingerprint = tuple[bytes, ...]


class TenancyConfigError(ValueError):
    """The scheduler must not start like this; the message says what to give."""


def shown_id(request_id: str) -> str:
    """A client's id as status messages echo it: quoted, at most SHOWN_ID_CHARS long."""
    if len(request_id) <= SHOWN_ID_CHARS:
        return repr(request_id)
    return repr(request_id[:SHOWN_ID_CHARS]) + "…"


def scoped_key(tenant: str, request_id: str) -> str:
    """The core's job id of a tenant's request (the anonymous tenant's is the id)."""
    return f"{tenant}/{request_id}" if tenant else request_id


def _field_bytes(request: scheduler_pb2.GenerateRequest, name: str) -> bytes:
    if name == "sampling":
        return request.sampling.SerializeToString(deterministic=True)
    if name == "messages":
        # Length-prefixed role and content: no two conversations give the same bytes.
        return b"".join(
            _framed(m.role.encode("utf-8")) + _framed(m.content.encode("utf-8"))
            for m in request.messages
        )
    if name == "priority":
        return str(request.priority).encode() if request.HasField("priority") else b"-"
    if name == "length_hint":  # absent: empty, as a fingerprint journaled before hints
        return str(request.length_hint).encode() if request.HasField("length_hint") else b""
    return str(getattr(request, name)).encode("utf-8")


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _digest(name: str, data: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\0" + data).digest()


def fingerprint(request: scheduler_pb2.GenerateRequest) -> Fingerprint:
    """One digest per field of FINGERPRINT_FIELDS: enough to tell which one a retry
    changed, without keeping a second copy of the prompt."""
    return tuple(_digest(name, _field_bytes(request, name)) for name in FINGERPRINT_FIELDS)


def differing_field(kept: Fingerprint, request: scheduler_pb2.GenerateRequest) -> str | None:
    """The first field in which ``request`` is not the request ``kept`` was made of.
    Fields newer than ``kept`` (journaled by an older scheduler) were empty then."""
    if len(kept) < len(FINGERPRINT_FIELDS):
        kept = kept + tuple(_digest(n, b"") for n in FINGERPRINT_FIELDS[len(kept) :])
    for name, mine, theirs in zip(FINGERPRINT_FIELDS, kept, fingerprint(request), strict=True):
        if mine != theirs:
            return name
    return None


def reuse_message(request_id: str, field: str) -> str:
    """ALREADY_EXISTS' message: which field differs (never the values: one is a prompt)."""
    return (
        f"request_id {shown_id(request_id)} is already used by a request with another "
        f"{field}; a new request needs a new request_id"
    )


def unknown_message(request_id: str) -> str:
    """NOT_FOUND's message, the same for an unknown id and another tenant's."""
    return f"request_id {shown_id(request_id)} is not known"


class Tenancy:
    """The public API's authentication: one place, asked by every RPC."""

    def __init__(self, tokens_file: str) -> None:
        # TokensFileError (a bad file) propagates: the scheduler refuses to start.
        self.store = TokenStore(tokens_file) if tokens_file else None

    async def tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        """The caller's tenant; aborts with UNAUTHENTICATED without a known token."""
        if self.store is None:
            return ANONYMOUS
        token, problem = bearer_token(context.invocation_metadata())
        if token is not None:
            tenant = self.store.authenticate(token)
            if tenant is not None:
                return tenant
            problem = "invalid bearer token"
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem or "invalid bearer token")
        raise AssertionError("abort raises")

    @staticmethod
    async def check_model(tenant: Tenant, model: str, context: grpc.aio.ServicerContext) -> None:
        """Aborts with PERMISSION_DENIED when ``tenant`` may not use ``model``."""
        if not tenant.may_use(model):
            allowed = ", ".join(sorted(tenant.models or ()))
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant.name!r} may not use model {model[:64]!r} (allowed: {allowed})",
            )

    @staticmethod
    async def check_priority(
        tenant: Tenant,
        request: scheduler_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Aborts with PERMISSION_DENIED when ``request`` asks for a band above the
        tenant's ``max_priority``."""
        problem = priority_problem(tenant, request)
        if problem is not None:
            await _deny(PriorityCapError(problem), context)

    @staticmethod
    async def check_length_hint(
        tenant: Tenant, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Aborts with PERMISSION_DENIED when ``request`` carries a length_hint that
        ``tenant`` may not send."""
        if request.HasField("length_hint") and not tenant.length_hints:
            await _deny(
                HintNotAllowedError(
                    f"length_hint is not allowed for tenant {tenant.name!r}: its tokens file "
                    "entry needs length_hints = true (a hint orders the queue); leave "
                    "length_hint out"
                ),
                context,
            )


async def _deny(error: PermissionError, context: grpc.aio.ServicerContext) -> None:
    """PERMISSION_DENIED with ``error``'s message, raised while ``error`` is handled: the
    refusal counter (``metrics.refusal_reason``) names the reason by the abort's
    ``__context__``, apart from a model the tenant may not use."""
    try:
        raise error
    except PermissionError:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))


def priority_problem(tenant: Tenant, request: scheduler_pb2.GenerateRequest) -> str | None:
    """Why ``tenant`` may not send ``request``'s priority, or None (absent = band 0)."""
    priority = request.priority if request.HasField("priority") else 0
    if tenant.may_ask(priority):
        return None
    return (
        f"priority {priority} is above tenant {tenant.name!r}'s max_priority "
        f"{tenant.max_priority} (its tokens file entry); send priority <= {tenant.max_priority}"
    )


def startup_policy(cfg: SchedulerConfig, tenancy: Tenancy) -> None:
    """Says at start who may call; refuses an open port without tokens."""
    if tenancy.store is None:
        if not is_loopback(cfg.host):
            raise TenancyConfigError(
                f"--host {cfg.host} is reachable from other machines but no --tokens-file "
                "is given: anyone could use the scheduler. Give --tokens-file, or listen on "
                "127.0.0.1"
            )
        log.warning(
            "no --tokens-file: no authentication, every caller is one tenant; "
            "listening on loopback (%s) only",
            cfg.host,
        )
        return
    log.info(
        "bearer tokens from %s: %d tokens, %d tenants",
        tenancy.store.path,
        len(tenancy.store),
        len(tenancy.store.tenants),
    )


__all__ = [
    "PriorityCapError",
    "Tenancy",
    "TenancyConfigError",
    "TokensFileError",
    "differing_field",
    "fingerprint",
    "priority_problem",
    "scoped_key",
    "shown_id",
    "startup_policy",
]
