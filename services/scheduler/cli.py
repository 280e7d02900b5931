"""``shortline scheduler serve`` (``shortline simulate`` is wired in ``shortline.simulation``)."""

from __future__ import annotations

import argparse
from typing import Any

from services.scheduler.config import SchedulerConfig, build_policy
from shortline.common.config import add_arguments, from_args


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.scheduler.core.policies import PolicyError
    from services.scheduler.service.server import serve

    cfg = from_args(SchedulerConfig, args, "scheduler")
    if not cfg.prediction_scale > 0:
        raise SystemExit(f"--prediction-scale must be > 0, got {cfg.prediction_scale}")
    if cfg.prediction_scale != 1.0 and not cfg.benchmark_mode:
        raise SystemExit(
            "--prediction-scale is for replay benchmarks only: add --benchmark-mode or drop it"
        )
    try:
        build_policy(cfg)
    except PolicyError as exc:
        raise SystemExit(f"--policy {cfg.policy}: {exc}") from exc
    asyncio.run(serve(cfg))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("scheduler", help="the SSJF scheduler service")
    sub = p.add_subparsers(dest="scheduler_command", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="serve the scheduler API over gRPC")
    add_arguments(serve, SchedulerConfig, "scheduler")
    serve.set_defaults(func=_serve)
