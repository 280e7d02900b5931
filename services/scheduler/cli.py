"""``shortline scheduler serve`` and ``shortline simulate``."""

from __future__ import annotations

import argparse
from typing import Any

from services.scheduler.config import SchedulerConfig
from services.scheduler.sim.runner import SimulateConfig
from shortline.common.config import add_arguments, from_args


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.scheduler.core.policies import PolicyError
    from services.scheduler.server import build_policy, serve

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


def _simulate(args: argparse.Namespace) -> int:
    from services.scheduler.sim.runner import main

    return main(from_args(SimulateConfig, args, "simulate"))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("scheduler", help="the SSJF scheduler service")
    sub = p.add_subparsers(dest="scheduler_command", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="serve the scheduler API over gRPC")
    add_arguments(serve, SchedulerConfig, "scheduler")
    serve.set_defaults(func=_serve)

    sim = subparsers.add_parser(
        "simulate", help="discrete-event simulation of the scheduling policies"
    )
    add_arguments(sim, SimulateConfig, "simulate")
    sim.set_defaults(func=_simulate)
