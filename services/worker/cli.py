"""``shortline worker serve`` and ``shortline triton serve``.

The servers are imported inside the commands, so that ``shortline --help``
and the other services' commands do not load gRPC, OpenTelemetry and
tritonclient.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from dataclasses import replace

from services.worker.config import TritonServeConfig, WorkerConfig
from shortline.common.config import add_arguments, from_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = subparsers.add_parser("worker", help="the worker service (slots in front of Triton)")
    wsub = worker.add_subparsers(dest="worker_command", metavar="COMMAND", required=True)
    serve = wsub.add_parser("serve", help="serve WorkerService over gRPC")
    add_arguments(serve, WorkerConfig, "worker")
    serve.set_defaults(func=serve_worker)

    triton = subparsers.add_parser("triton", help="the embedded Triton server (CPU models)")
    tsub = triton.add_subparsers(dest="triton_command", metavar="COMMAND", required=True)
    tserve = tsub.add_parser(
        "serve", help="run Triton with smollm2-135m-instruct and replay until SIGTERM/SIGINT"
    )
    add_arguments(tserve, TritonServeConfig, "triton")
    tserve.set_defaults(func=serve_triton)


def serve_triton(args: argparse.Namespace) -> int:
    from services.worker.triton.embedded import EmbeddedTriton

    config = from_args(TritonServeConfig, args, "triton")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    triton = EmbeddedTriton(config)
    try:
        triton.start()
        print(f"triton ready grpc={triton.grpc_url} http={triton.http_url}", flush=True)
        while not stop.wait(1.0):
            if not triton.is_running():
                log.error("tritonserver exited unexpectedly:\n%s", triton.log_tail())
                return 1
        log.info("stopping Triton")
        return 0
    finally:
        triton.stop()


def serve_worker(args: argparse.Namespace) -> int:
    config = from_args(WorkerConfig, args, "worker")
    if not config.embedded and not config.triton:
        raise SystemExit("give --triton HOST:PORT or --embedded")
    if not config.embedded:
        return asyncio.run(_serve_worker(config, config.triton))
    from services.worker.triton.embedded import EmbeddedTriton

    # Started from the main thread: the server gets SIGTERM when this thread dies.
    base = from_args(TritonServeConfig, None, "triton")
    models = base.models if config.auto else ",".join(config.explicit_models())
    embedded = EmbeddedTriton(replace(base, models=models))
    try:
        embedded.start()
        return asyncio.run(_serve_worker(config, embedded.grpc_url))
    finally:
        embedded.stop()


async def _serve_worker(config: WorkerConfig, triton_url: str) -> int:
    from services.worker import metrics
    from services.worker.service.server import WorkerServer, WorkerStartError
    from shortline.common import grpc_server
    from shortline.common.prometheus import start_metrics_server
    from shortline.common.telemetry import setup_tracing

    setup_tracing("worker")
    server = WorkerServer(config, triton_url)
    start_metrics_server(config.metrics_port, config.host, metrics.REGISTRY)
    try:
        await server.start()
    except WorkerStartError as exc:
        raise SystemExit(f"worker: {exc}") from None
    print(f"worker {server.worker_id} listening on {server.address}", flush=True)
    serving = asyncio.ensure_future(
        grpc_server.run_until_signal(
            server.server, on_stop=server.stop, on_drain=lambda: server.drain(config.drain_grace_s)
        )
    )
    # A scheduler that refuses the worker later (it was down at the start) is as final
    # as one refusing at the start: exit naming why, for the supervisor to show.
    refused = asyncio.ensure_future(server.refused.wait())
    await asyncio.wait({serving, refused}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        serving.cancel()
        await server.stop(0)
        raise SystemExit(f"worker: {server.refusal}")
    refused.cancel()
    await serving
    return 0
