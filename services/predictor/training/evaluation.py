"""Held-out comparison of heads against two baselines a scheduler could use for free.

- ``mean_length``: the target's mean train length for every prompt (what FCFS
  effectively assumes; it orders nothing, so its tau is 0).
- ``prompt_length_linear``: least squares of output tokens on prompt tokens
  (the cheapest real predictor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from services.predictor.heads import Head
from services.predictor.training.buckets import bucket_of
from services.predictor.training.sources import TrainingData
from shortline.common.stats import kendall_tau, spearman

METRIC_NAMES = ("kendall_tau", "spearman", "mae_tokens", "bucket_accuracy")


def evaluate(
    predicted: Sequence[float] | np.ndarray,
    actual: Sequence[float] | np.ndarray,
    boundaries: Sequence[float],
    predicted_buckets: np.ndarray | None = None,
) -> dict[str, float]:
    """kendall_tau, spearman, mae_tokens, bucket_accuracy of predictions against truth.

    Bucket accuracy uses ``predicted_buckets`` when a head predicts buckets
    directly, else the bucket its predicted length falls into.
    """
    p = np.asarray(predicted, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    pb = bucket_of(p, boundaries) if predicted_buckets is None else predicted_buckets
    return {
        "kendall_tau": kendall_tau(p, a),
        "spearman": spearman(p, a),
        "mae_tokens": float(np.abs(p - a).mean()),
        "bucket_accuracy": float((pb == bucket_of(a, boundaries)).mean()),
    }


def baseline_predictions(data: TrainingData, split: str) -> dict[str, np.ndarray]:
    train = data.indices("train")
    rows = data.indices(split)
    mean = float(data.tokens[train].mean())
    x = data.prompt_tokens[train]
    design = np.c_[np.ones_like(x), x]
    coef, *_ = np.linalg.lstsq(design, data.tokens[train], rcond=None)
    linear = coef[0] + coef[1] * data.prompt_tokens[rows]
    return {
        "mean_length": np.full(len(rows), mean),
        "prompt_length_linear": np.maximum(linear, 1.0),
    }


def evaluate_split(
    data: TrainingData,
    features: np.ndarray,
    heads: Mapping[str, Head],
    boundaries: list[float],
    split: str = "test",
) -> dict[str, Any]:
    """Metrics of every head and baseline on ``split`` (features: one row per data row)."""
    rows = data.indices(split)
    actual = data.tokens[rows]
    out: dict[str, Any] = {
        "target_model": data.target_model,
        "split": split,
        "n": len(rows),
        "heads": {},
        "baselines": {},
    }
    for name, head in heads.items():
        pred = head.predict(features[rows])
        buckets = pred["bucket"] if head.kind == "cls" else None
        out["heads"][name] = evaluate(pred["tokens"], actual, boundaries, buckets)
    for name, values in baseline_predictions(data, split).items():
        out["baselines"][name] = evaluate(values, actual, boundaries)
    return out


def format_table(result: Mapping[str, Any]) -> str:
    """A markdown table a person can paste into a note."""
    lines = [
        f"{result['target_model']} — {result['split']} split, n={result['n']}",
        "",
        "| predictor | kendall_tau | spearman | mae_tokens | bucket_accuracy |",
        "|---|---|---|---|---|",
    ]
    default = result.get("default_head")
    for group in ("heads", "baselines"):
        for name, metrics in result[group].items():
            label = name if group == "baselines" else f"head {name}"
            if name == default and group == "heads":
                label += " (default)"
            lines.append(
                f"| {label} | {metrics['kendall_tau']:.3f} | {metrics['spearman']:.3f} | "
                f"{metrics['mae_tokens']:.1f} | {metrics['bucket_accuracy']:.3f} |"
            )
    return "\n".join(lines)
