"""``shortline simulate``, wired with the real length predictor (the composition root).

The simulator (``services.scheduler.sim``) imports no other service: it takes a
:class:`~services.scheduler.sim.workload.LengthPredictor`. This module adapts
the predictor's in-process API (``services.predictor.offline``) to it and
registers the ``shortline simulate`` subcommand with the simulator's flags.

    from shortline.simulation import real_predictor
    predicted, _ = wl.predictions_for("real", lengths, model, rng, real_predictor())
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from services.predictor import offline
from services.predictor.offline import heads_dir, predict_tokens
from services.scheduler.sim.runner import SimulateConfig, main
from services.scheduler.sim.traffic import TrafficError
from services.scheduler.sim.workload import LengthPredictor
from shortline.common.config import add_arguments, from_args


class OfflinePredictor:
    """The shipped heads, run in process (``services.predictor.offline``)."""

    def predict(self, target_model: str, prompts: list[str], head: str | None) -> np.ndarray:
        return predict_tokens(target_model, prompts, head=head)

    def quantiles(
        self, target_model: str, prompts: list[str], head: str | None
    ) -> np.ndarray | None:
        """The predictor's quantiles at ``QUANTILE_LEVELS`` (n x levels), or None when the
        head's card has no distribution (the simulator then builds a log-normal from
        held-out residuals, and says so)."""
        _, quantiles = offline.predict_distribution(target_model, prompts, head=head)
        got = np.asarray(quantiles, dtype=np.float64)
        return got if got.ndim == 2 and got.shape[1] > 0 else None

    def fingerprint(self, target_model: str) -> bytes:
        # The names and bytes of the target's head files: a retrained head changes them.
        # The same bytes the simulator hashed before the predictor was injected, so the
        # predictions already cached on disk stay valid.
        out = bytearray()
        for f in sorted((heads_dir() / target_model).glob("*")):
            if f.is_file():
                out += f.name.encode()
                out += f.read_bytes()
        return bytes(out)


def real_predictor() -> LengthPredictor:
    return OfflinePredictor()


def _simulate(args: argparse.Namespace) -> int:
    try:
        return main(from_args(SimulateConfig, args, "simulate"), real_predictor())
    except TrafficError as exc:
        # A bad workload file or log is the operator's to fix: one line naming the file,
        # line and field, not a traceback.
        print(f"shortline simulate: {exc}", file=sys.stderr)
        return 2


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "simulate", help="discrete-event simulation of the scheduling policies"
    )
    add_arguments(sim, SimulateConfig, "simulate")
    sim.set_defaults(func=_simulate)
