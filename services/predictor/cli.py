"""``shortline predictor {train,eval,serve,versions,canary,promote,rollback}``.

``serve`` is here; ``train`` and ``eval`` live with the training code
(``training/cli.py``), the rollout steps in ``rollout.py``; this module registers
them. Heavy imports (torch, transformers, grpc) happen inside each command.
"""

from __future__ import annotations

import argparse
from typing import Any

from services.predictor import rollout
from services.predictor.config import PredictorConfig
from services.predictor.training import cli as training_cli
from shortline.common import config as shortline_config


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predictor",
        help="length predictor: train heads, evaluate them, serve them over gRPC, roll "
        "versions out and back",
    )
    sub = parser.add_subparsers(dest="predictor_command", metavar="SUBCOMMAND", required=True)
    training_cli.register(sub)
    serve = sub.add_parser("serve", help="serve PredictorService over gRPC")
    shortline_config.add_arguments(serve, PredictorConfig, "predictor")
    serve.set_defaults(func=_serve)
    rollout.register(sub)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.predictor.service import serve_forever

    cfg = shortline_config.from_args(PredictorConfig, args, "predictor")
    asyncio.run(serve_forever(cfg))
    return 0
