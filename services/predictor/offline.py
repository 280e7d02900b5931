"""In-process predictions for simulators and benchmarks (no gRPC).

Uses the same :class:`PredictorCore` as the service, loaded once per process
from :func:`heads_dir`: ``SHORTLINE_PREDICTOR_HEADS_DIR``, else the shipped heads
(``services/predictor/artifacts/heads_distilled``, package data).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.predictor.core import MAX_PROMPTS, PredictorCore, Query
from services.predictor.heads import SHIPPED_HEADS_DIR
from shortline.common.length_distribution import QUANTILE_LEVELS

HEADS_DIR_ENV = "SHORTLINE_PREDICTOR_HEADS_DIR"
_lock = threading.Lock()


def heads_dir() -> Path:
    """The heads folder offline predictions use: ``$SHORTLINE_PREDICTOR_HEADS_DIR``, else the
    shipped default."""
    return Path(os.environ.get(HEADS_DIR_ENV, str(SHIPPED_HEADS_DIR)))


@functools.cache
def _core(folder: Path) -> PredictorCore:
    # The torch backend: the hybrid one sets torch to one intra-op thread for the
    # whole process, which a simulator or benchmark that hosts us may not expect.
    return PredictorCore(folder, backend="torch")


def core() -> PredictorCore:
    """The process-wide predictor (loaded on first use)."""
    with _lock:
        return _core(heads_dir())


def available_targets() -> list[str]:
    """Target models with shipped heads (read from the cards, no encoder loaded)."""
    folder = heads_dir()
    if not folder.is_dir():
        return []
    return sorted(p.parent.name for p in folder.glob("*/card.json"))


def predict_tokens(
    target_model: str, prompts: Sequence[str], head: str | None = None
) -> np.ndarray:
    """Predicted output tokens (float) per prompt; ``head`` is reg, cls, rank or the default.

    Any number of prompts: they are predicted in chunks of the service's batch limit.
    Raises ``UnknownTargetError``/``UnknownHeadError`` (LookupError) or
    ``BadPromptsError`` (ValueError) for bad input, like the service's status codes.
    """
    if not prompts:
        return np.zeros(0, dtype=np.float64)
    predictor = core()
    chunks = [
        predictor.predict(
            Query(target_model, list(prompts[i : i + MAX_PROMPTS]), head, embedding=False)
        ).tokens
        for i in range(0, len(prompts), MAX_PROMPTS)
    ]
    return np.concatenate(chunks).astype(np.float64)


def predict_distribution(
    target_model: str, prompts: Sequence[str], head: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted tokens ``(n,)`` and their quantiles ``(n, len(QUANTILE_LEVELS))`` per prompt.

    The quantiles are output tokens at ``shortline.common.length_distribution.QUANTILE_LEVELS``
    (non-decreasing along a row, each >= 1), from the head's calibrated distribution
    (``heads.py``). A head whose card has none gives ``(n, 0)``: the caller keeps the
    point. Same chunking and errors as :func:`predict_tokens`.
    """
    if not prompts:
        return np.zeros(0, dtype=np.float64), np.zeros((0, len(QUANTILE_LEVELS)))
    predictor = core()
    results = [
        predictor.predict(
            Query(target_model, list(prompts[i : i + MAX_PROMPTS]), head, embedding=False)
        )
        for i in range(0, len(prompts), MAX_PROMPTS)
    ]
    tokens = np.concatenate([r.tokens for r in results]).astype(np.float64)
    quantiles = np.concatenate([r.quantiles for r in results]).astype(np.float64)
    return tokens, quantiles
