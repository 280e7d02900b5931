"""The gateway's ASGI app (Starlette): routes, the scheduler's clients, readiness.

Starlette over FastAPI: the gateway checks OpenAI's request bodies itself
(params.py, so that every unsupported field is a 400 naming it in OpenAI's
format) and writes its own SSE, so FastAPI's model layer would only add a
second, differently-worded validation. Starlette and uvicorn are the ASGI
stack FastAPI itself runs on, kept by the same people.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.gateway import http
from services.gateway.chat import ChatCompletion
from services.gateway.clients import ClientPool
from services.gateway.completions import Completion, Limiter
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError, from_rpc
from services.gateway.params import parse_chat, parse_completion
from shortline.client import ClientOptions
from shortline.client.channel import aio_channel, call_metadata
from shortline.common.auth import parse_authorization
from shortline.scheduler.v1 import scheduler_pb2

log = logging.getLogger("shortline.gateway")

SCHEDULER_SERVICE = "shortline.scheduler.v1.SchedulerService"
# Readiness and model listing are quick calls: a scheduler slower than this is not ready.
PROBE_TIMEOUT_S = 2.0


def client_options(cfg: GatewayConfig) -> ClientOptions:
    """The SDK's options; the token only from --token-file (never SHORTLINE_TOKEN, which
    would silently lend a token to every anonymous HTTP caller)."""
    return ClientOptions.from_files(
        cfg.scheduler,
        ca_file=cfg.tls_ca or None,
        token_file=cfg.token_file or None,
        token=None if cfg.token_file else "",
        tls=cfg.scheduler_tls,
        retries=cfg.retries,
    )


@dataclass
class _State:
    pool: ClientPool
    limiter: Limiter
    health: health_pb2_grpc.HealthStub
    channel: grpc.aio.Channel


def bearer(request: Request) -> str | None:
    """The caller's token; None without an Authorization header; 401 if it is malformed."""
    values = request.headers.getlist("authorization")
    if not values:
        return None
    token = parse_authorization(values[0]) if len(values) == 1 else None
    if token is None:
        raise ApiError(
            401,
            "invalid Authorization header: send 'Authorization: Bearer <token>'",
            code="invalid_api_key",
        )
    return token


# A client's own request id: what the scheduler accepts (1..128 printable characters),
# narrowed to characters that are safe in headers, logs and the response's id.
REQUEST_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")


def client_request_id(request: Request) -> str | None:
    """The ``X-Request-Id`` the client chose, so a retry (through any gateway) reaches
    the same scheduler request: it reattaches to it running, or gets its result once
    finished (within the scheduler's result TTL); the same id with a different body is
    a 409. None without the header; 400 naming it when it is malformed."""
    values = request.headers.getlist("x-request-id")
    if not values:
        return None
    if len(values) != 1 or REQUEST_ID.fullmatch(values[0]) is None:
        raise ApiError(
            400,
            "X-Request-Id must be one header of 1..128 characters from A-Z a-z 0-9 . _ ~ : -",
            param="X-Request-Id",
        )
    return values[0]


def create_app(cfg: GatewayConfig, options: ClientOptions | None = None) -> Starlette:
    base = options if options is not None else client_options(cfg)
    holder: dict[str, _State] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Channels belong to the running loop: made here, not at import.
        channel = aio_channel(base)
        holder["s"] = _State(
            ClientPool(base, cfg.max_clients),
            Limiter(cfg.max_concurrent),
            health_pb2_grpc.HealthStub(channel),
            channel,
        )
        try:
            yield
        finally:
            state = holder.pop("s")
            await state.pool.close()
            await channel.close(None)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        try:
            answer = await holder["s"].health.Check(
                health_pb2.HealthCheckRequest(service=SCHEDULER_SERVICE), timeout=PROBE_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return http.error_response(
                ApiError(503, f"scheduler not reachable: {exc.code().name}", type="server_error")
            )
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return http.error_response(
                ApiError(503, "the scheduler is not serving", type="server_error")
            )
        return JSONResponse({"status": "ready"})

    async def models(request: Request) -> Response:
        try:
            token = bearer(request)
            async with holder["s"].pool.client(token) as client:
                listed = await client.stub.ListModels(
                    scheduler_pb2.ListModelsRequest(),
                    timeout=PROBE_TIMEOUT_S,
                    metadata=call_metadata(client.options),
                )
        except ApiError as exc:
            return http.error_response(exc)
        except grpc.RpcError as exc:
            return http.error_response(from_rpc(exc))
        data = [
            {"id": m.model, "object": "model", "created": 0, "owned_by": "shortline"}
            for m in listed.models
        ]
        return JSONResponse({"object": "list", "data": data})

    def generation(
        parse: Callable[[Any, float], Any], job_type: type[Completion], kind: str
    ) -> Callable[[Request], Awaitable[Response]]:
        """One generation endpoint: parse the body, then stream or answer the job."""

        async def endpoint(request: Request) -> Response:
            try:
                body = await http.read_json(request, cfg.max_body_bytes)
                params = parse(body, cfg.max_deadline_s)
                token = bearer(request)
                chosen = client_request_id(request)
            except ApiError as exc:
                return http.error_response(exc)
            state = holder["s"]
            job = job_type(params, token, state.pool, state.limiter, cfg.default_deadline_s, chosen)
            log.debug(
                "%s %s: model %s, stream %s", kind, job.request_id, params.model, params.stream
            )
            return http.Exchange(job)

        return endpoint

    completions = generation(parse_completion, Completion, "completion")
    chat = generation(parse_chat, ChatCompletion, "chat")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
