"""``shortline gateway serve``: the OpenAI-compatible HTTP front (uvicorn)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from services.gateway.config import GatewayConfig
from shortline.common.config import add_arguments, from_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("gateway", help="OpenAI-compatible HTTP gateway to the scheduler")
    sub = p.add_subparsers(dest="gateway_command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve /v1/completions, /v1/chat/completions, /v1/models, /health and /ready",
        description="Translates OpenAI's HTTP API to the scheduler's Generate. Listens on "
        "127.0.0.1 unless --host says otherwise; a client's 'Authorization: Bearer' token is "
        "passed to the scheduler, which checks it.",
    )
    add_arguments(serve, GatewayConfig, "gateway")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from services.gateway.app import create_app
    from shortline.client import ClientConfigError

    cfg = from_args(GatewayConfig, args, "gateway")
    try:
        app = create_app(cfg)
    except ClientConfigError as exc:
        raise SystemExit(f"shortline gateway serve: {exc}") from exc
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        ssl_certfile=cfg.tls_cert or None,
        ssl_keyfile=cfg.tls_key or None,
        log_level="warning",
        # Uvicorn's access log would name every client; the gateway logs at debug.
        access_log=False,
        limit_concurrency=cfg.max_concurrent + 64,
        server_header=False,
        # On SIGTERM, requests in flight get this long to finish (the drain).
        timeout_graceful_shutdown=max(1, math.ceil(cfg.drain_grace_s)),
    )
    return 0
