"""The ``shortline`` command: one subcommand per service and tool.

Each subcommand lives with the code it drives and exposes
``register(subparsers)``; that function adds a parser whose ``func`` default
takes the parsed arguments and returns an exit code. Heavy imports (torch,
Triton) happen inside ``func``, so ``shortline --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (module, what it adds): imported in this order to build the parser.
COMMAND_MODULES: tuple[str, ...] = (
    "services.predictor.cli",
    "services.worker.cli",
    "services.scheduler.cli",
    "services.gateway.cli",
    "shortline.simulation",
    "shortline.commands",
    "shortline.certs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortline",
        description="Speculative shortest-job-first scheduling for interactive LLM serving.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from shortline.common.tls import TlsConfigError

    try:
        code = args.func(args)
    except TlsConfigError as exc:
        # A wrong TLS file is the operator's to fix: one line naming it, not a traceback.
        print(f"shortline {args.command}: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
