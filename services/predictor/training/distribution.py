"""Fitting and judging the heads' length distributions (the card's ``distribution`` section).

Every candidate is scored the same way on rows no head was fitted on: the mean
log density of ``log1p(true tokens)`` (nats; the log1p space makes families and
the bucket histogram comparable, the Jacobian being the same for all) and the
share of true lengths at or below each predicted quantile (calibration: the
share should equal the level).

Candidates:

- a location-scale family (``student_t``, ``gaussian``, ``logistic``) on
  ``log1p(tokens)`` around the head's log prediction. The shift is the median
  residual on the train rows (559 rows: the head's bias is fitted there with
  little noise; the val median moved by up to 0.2 nats with 73 rows), the scale
  (and Student-t's df) by maximum likelihood on the val residuals (the train
  residuals are too small: the head saw those rows). ``val_location``: the
  same with the shift fitted on val too.
- ``cls_buckets``: the classification head's five probabilities spread
  uniformly in log1p space over each bucket (from 1 token to the longest
  train answer), which needs no fitting at all.
- ``val_empirical``: the val residuals' own quantiles (calibration only: no density).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from services.predictor.heads import (
    DISTRIBUTION_FAMILIES,
    DISTRIBUTION_SECTION,
    Head,
    HeadDistribution,
)
from services.predictor.training.sources import TrainingData
from shortline.common.length_distribution import QUANTILE_LEVELS

CHOSEN = "student_t"
# Student-t's df is kept where 73 residuals can say something about it.
DF_RANGE = (1.0, 100.0)
# Fewer val rows than this fit no distribution (the card then has none).
MIN_VAL_ROWS = 10
# Smallest scale fitted (nats of log1p(tokens): about 1% of the length).
SCALE_FLOOR = 0.01
_SCIPY = {"student_t": stats.t, "gaussian": stats.norm, "logistic": stats.logistic}


def residuals(head: Head, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``log1p(true) - log1p(predicted)`` for each row."""
    predicted = head.predict(features)["tokens"]
    return np.asarray(np.log1p(tokens) - np.log1p(predicted), dtype=np.float64)


def fit_family(family: str, val: np.ndarray, shift: float) -> dict[str, float]:
    """Scale (and df) by maximum likelihood on ``val`` residuals, location fixed at ``shift``.

    The scale is at least ``SCALE_FLOOR``: val rows a head predicts exactly (a log of
    repeated prompts) would otherwise give a zero-width distribution.
    """
    if family == "gaussian":
        scale = float(np.sqrt(np.mean((val - shift) ** 2)))
        return {"shift": shift, "scale": max(scale, SCALE_FLOOR)}
    if family == "logistic":
        _, scale = stats.logistic.fit(val, floc=shift)
        return {"shift": shift, "scale": max(float(scale), SCALE_FLOOR)}
    if family == "student_t":
        df, _, scale = stats.t.fit(val, floc=shift)
        if not DF_RANGE[0] <= df <= DF_RANGE[1]:
            df = float(np.clip(df, *DF_RANGE))
            _, _, scale = stats.t.fit(val, fdf=df, floc=shift)
        return {"shift": shift, "scale": max(float(scale), SCALE_FLOOR), "df": float(df)}
    raise ValueError(f"unknown family {family!r}; known: {', '.join(DISTRIBUTION_FAMILIES)}")


def calibration(quantiles: np.ndarray, actual: np.ndarray) -> list[float]:
    """Share of ``actual`` at or below each column of ``quantiles``."""
    return [float(x) for x in (actual[:, None] <= quantiles).mean(axis=0)]


def _summary(log_lik: float | None, shares: list[float]) -> dict[str, Any]:
    errors = np.abs(np.asarray(shares) - np.asarray(QUANTILE_LEVELS))
    return {
        "log_lik": None if log_lik is None else round(log_lik, 4),
        "shares": [round(s, 4) for s in shares],
        "max_abs_error": round(float(errors.max()), 4),
    }


def score_family(
    dist: HeadDistribution, predicted: np.ndarray, actual: np.ndarray
) -> dict[str, Any]:
    """Held-out log-likelihood and calibration of a fitted family."""
    resid = np.log1p(actual) - np.log1p(predicted)
    law = _SCIPY[dist.family]
    shape = (dist.df,) if dist.family == "student_t" else ()
    log_lik = float(law.logpdf(resid, *shape, loc=dist.shift, scale=dist.scale).mean())
    return _summary(log_lik, calibration(dist.quantiles(predicted), actual))


def score_buckets(
    probs: np.ndarray, boundaries: list[float], longest: float, actual: np.ndarray
) -> dict[str, Any]:
    """The cls head's probabilities as a histogram, uniform in log1p within each bucket."""
    edges = np.log1p(np.r_[1.0, boundaries, max(longest, boundaries[-1] + 1.0)])
    widths = np.diff(edges)
    y = np.clip(np.log1p(actual), edges[0], edges[-1])
    k = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, len(widths) - 1)
    density = probs[np.arange(len(y)), k] / widths[k]
    log_lik = float(np.log(np.maximum(density, 1e-12)).mean())
    cdf = np.c_[np.zeros(len(probs)), np.cumsum(probs, axis=1)]
    q = np.empty((len(probs), len(QUANTILE_LEVELS)))
    for i in range(len(probs)):
        q[i] = np.expm1(np.interp(QUANTILE_LEVELS, cdf[i], edges))
    return _summary(log_lik, calibration(q, actual))


def head_residuals(head: Head, features: np.ndarray, data: TrainingData) -> dict[str, np.ndarray]:
    return {
        s: residuals(head, features[data.indices(s)], data.tokens[data.indices(s)])
        for s in ("train", "val", "test")
    }


def fit_params(resid: Mapping[str, np.ndarray], family: str) -> dict[str, float]:
    """A head's parameters: train median shift, val scale (see the module's docstring)."""
    shift = float(np.median(resid["train"])) if len(resid["train"]) else 0.0
    return fit_family(family, resid["val"], shift)


def section(
    heads: Mapping[str, Head],
    features: np.ndarray,
    data: TrainingData,
    family: str = CHOSEN,
) -> dict[str, Any]:
    """The card's ``distribution`` section, with its test-split log-likelihood and calibration.

    ``features``: one row per data row (the heads' input).
    """
    if len(data.indices("val")) < MIN_VAL_ROWS:
        raise ValueError(f"too few val rows to fit a distribution: {len(data.indices('val'))}")
    longest = float(data.tokens[data.indices("train")].max())
    test_rows = data.indices("test")
    params: dict[str, Any] = {}
    test: dict[str, Any] = {}
    for name, head in heads.items():
        resid = head_residuals(head, features, data)
        # Rounded as the card stores them: the test figures are those of what is served.
        params[name] = {k: round(v, 5) for k, v in fit_params(resid, family).items()}
        dist = HeadDistribution.of(family, params[name], longest)
        if len(test_rows):
            predicted = head.predict(features[test_rows])["tokens"]
            test[name] = score_family(dist, predicted, data.tokens[test_rows])
    return {
        "family": family,
        "space": "log1p(tokens)",
        "levels": list(QUANTILE_LEVELS),
        "max_tokens": longest,
        "heads": params,
        "rule": (
            "location: the head's log1p prediction + the median train residual; scale"
            + (" and df" if family == "student_t" else "")
            + " by maximum likelihood on the val residuals; quantiles capped at max_tokens "
            "(the longest train answer)"
        ),
        "fitted_on": {"train": len(data.indices("train")), "val": len(data.indices("val"))},
        "test": {"rows": len(test_rows), "by_head": test},
    }


def compare(
    heads: Mapping[str, Head], features: np.ndarray, data: TrainingData
) -> dict[str, dict[str, Any]]:
    """Every candidate of the module's docstring on the test split, per head."""
    longest = float(data.tokens[data.indices("train")].max())
    rows = data.indices("test")
    actual = data.tokens[rows]
    out: dict[str, dict[str, Any]] = {}
    for name, head in heads.items():
        resid = head_residuals(head, features, data)
        predicted = head.predict(features[rows])
        cands: dict[str, Any] = {}
        for family in DISTRIBUTION_FAMILIES:
            dist = HeadDistribution.of(family, fit_params(resid, family), longest)
            cands[family] = score_family(dist, predicted["tokens"], actual)
        val_shift = float(np.median(resid["val"]))
        loose = HeadDistribution.of(CHOSEN, fit_family(CHOSEN, resid["val"], val_shift), longest)
        cands[f"{CHOSEN}_val_location"] = score_family(loose, predicted["tokens"], actual)
        empirical = np.quantile(resid["val"], QUANTILE_LEVELS)
        q = np.expm1(np.log1p(predicted["tokens"])[:, None] + empirical[None, :])
        cands["val_empirical"] = _summary(None, calibration(q, actual))
        if head.kind == "cls":
            cands["cls_buckets"] = score_buckets(
                predicted["probs"], head.bucket_boundaries, longest, actual
            )
        out[name] = cands
    return out


def write_section(card_file: Path, new: Mapping[str, Any]) -> dict[str, Any]:
    """Sets the card's distribution section, leaving every other field (and the version) as is."""
    card: dict[str, Any] = json.loads(card_file.read_text())
    card[DISTRIBUTION_SECTION] = dict(new)
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    return card
