"""Trained heads as small versioned artifacts, and their inference in numpy.

A head is an MLP on a feature extractor's output (by default the mean-pooled
hidden states of MiniLM layers 3-6, 1536-d; see ``features/``). Its weights live
in one ``.npz`` per head and its description in the target's ``card.json``
(the Triton habit: models are declared by files the server reads at start).
The shipped heads folders are package data under ``artifacts/`` (no code there):
``artifacts/heads_distilled`` (the default: MiniLM with a weight delta distilled
from SmolLM2), ``artifacts/heads`` (stock MiniLM), ``artifacts/heads_smollm2``.
Writing heads and cards is training's job (``training/minilm_heads.py``).
Inference is a few matrix products in numpy, so the service needs torch only
for the encoder, and one implementation serves gRPC and offline callers alike.

Kinds and how each turns its output into tokens:

- ``reg``: regression on log(1 + tokens); tokens = exp(output) - 1.
- ``cls``: five buckets split at the target's train p25/p50/p75/p99; tokens =
  the probability-weighted mean of the buckets' train medians.
- ``rank``: a pairwise ranking score; tokens = the train length at the same
  quantile as the score among train scores (monotone, so order is kept).

Distributions (issue 19): a card's ``distribution`` section gives each head a
location-scale family on ``log1p(tokens)`` centred on the head's own log
prediction (plus a shift), so the quantiles at ``QUANTILE_LEVELS`` cost a few
numpy operations per prompt and no second encoder pass, and any head folder
gains them from its card alone (``shortline predictor calibrate`` writes the
section, training writes it too). A card without the section (every card
before issue 19, or a family this code does not know) serves no quantiles::

    "distribution": {"family": "student_t", "space": "log1p(tokens)",
                     "max_tokens": 1790.0,
                     "heads": {"reg": {"shift": -0.006, "scale": 0.29, "df": 1.7}, ...}}

``max_tokens`` caps every quantile (the longest answer in the fitting data): the
fitted tails are heavy on the short side, and a symmetric family would otherwise
put the 0.99 quantile at ten times the point.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import special

from shortline.common.length_distribution import QUANTILE_LEVELS

HeadKindName = Literal["reg", "cls", "rank"]
HEAD_KINDS: tuple[HeadKindName, ...] = ("reg", "cls", "rank")
HEAD_KIND_LONG = {"reg": "regression", "cls": "classification", "rank": "ranking"}
BUCKET_PERCENTILES = (25.0, 50.0, 75.0, 99.0)
N_BUCKETS = len(BUCKET_PERCENTILES) + 1

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
STOCK_HEADS_DIR = ARTIFACTS_DIR / "heads"
SMOLLM2_HEADS_DIR = ARTIFACTS_DIR / "heads_smollm2"
DISTILLED_HEADS_DIR = ARTIFACTS_DIR / "heads_distilled"
# The default heads. The distilled ones, since `python -m bench.heads` (2026-12-05) found
# them ahead of the stock ones for every shipped target on both measures: held-out tau
# of the default head (0.49-0.57 against 0.37-0.47) and ssjf's share of the oracle's
# mean-JCT gain at rho 0.9 in every batching mode (e.g. Llama-3-8B 74/58/74% against
# 63/45/65%), at the same speed (artifacts/heads_distilled/README.md).
SHIPPED_HEADS_DIR = DISTILLED_HEADS_DIR


DISTRIBUTION_FAMILIES = ("student_t", "gaussian", "logistic")
DISTRIBUTION_SECTION = "distribution"
# log1p of the largest length a quantile may reach, whatever the card says.
_LOG_CEILING = 16.0


def standard_quantiles(family: str, levels: Sequence[float], df: float = 0.0) -> np.ndarray:
    """Quantiles of the family's standard member (location 0, scale 1) at ``levels``."""
    p = np.asarray(levels, dtype=np.float64)
    if family == "gaussian":
        return np.asarray(special.ndtri(p), dtype=np.float64)
    if family == "logistic":
        return np.asarray(special.logit(p), dtype=np.float64)
    if family == "student_t":
        if not df > 0.0:
            raise ValueError(f"student_t needs df > 0, got {df}")
        return np.asarray(special.stdtrit(df, p), dtype=np.float64)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(DISTRIBUTION_FAMILIES)}")


@dataclass(frozen=True)
class HeadDistribution:
    """One head's calibrated spread: the point's log plus ``shift + scale * z(level)``."""

    family: str
    shift: float
    scale: float
    df: float
    max_tokens: float
    levels: tuple[float, ...]
    offsets: np.ndarray
    """``shift + scale * z`` per level, computed once at load."""

    @staticmethod
    def of(
        family: str,
        params: Mapping[str, Any],
        max_tokens: float,
        levels: Sequence[float] = QUANTILE_LEVELS,
    ) -> HeadDistribution:
        shift, scale = float(params["shift"]), float(params["scale"])
        df = float(params.get("df", 0.0))
        if not scale > 0.0 or not np.isfinite(scale) or not np.isfinite(shift):
            raise ValueError(f"bad {family} parameters {dict(params)}")
        z = standard_quantiles(family, levels, df)
        return HeadDistribution(
            family, shift, scale, df, float(max_tokens), tuple(levels), shift + scale * z
        )

    def quantiles(self, tokens: np.ndarray) -> np.ndarray:
        """(n, levels) output tokens, non-decreasing along each row, each >= 1."""
        loc = np.log1p(np.maximum(np.asarray(tokens, dtype=np.float64), 0.0))
        logq = np.minimum(loc[:, None] + self.offsets[None, :], _LOG_CEILING)
        return np.clip(np.expm1(logq), 1.0, max(self.max_tokens, 1.0))


def distributions_of(card: Mapping[str, Any]) -> dict[str, HeadDistribution]:
    """Each head's distribution from the card's section; {} when the card has none.

    A section this code cannot read (a family added later) also gives {}: the
    heads still serve their points, as from an old card.
    """
    section = card.get(DISTRIBUTION_SECTION)
    if not isinstance(section, Mapping):
        return {}
    family = str(section.get("family", ""))
    if family not in DISTRIBUTION_FAMILIES:
        return {}
    cap = float(section.get("max_tokens", np.expm1(_LOG_CEILING)))
    return {
        name: HeadDistribution.of(family, params, cap)
        for name, params in section.get("heads", {}).items()
    }


@dataclass
class Head:
    """One trained head: weights plus what is needed to map its output to tokens."""

    kind: HeadKindName
    version: str
    layers: list[tuple[np.ndarray, np.ndarray]]
    bucket_boundaries: list[float]
    bucket_medians: list[float]
    score_quantiles: np.ndarray | None = None
    length_quantiles: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    distribution: HeadDistribution | None = None
    """From the card's ``distribution`` section; None: no quantiles (an older card)."""

    def raw(self, embeddings: np.ndarray) -> np.ndarray:
        """MLP output: ReLU between layers, none after the last."""
        x = embeddings.astype(np.float32, copy=False)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                np.maximum(x, 0.0, out=x)
        return x

    def predict(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """tokens, score, bucket and (for cls) probabilities for each embedding row."""
        return self.from_raw(self.raw(embeddings))

    def from_raw(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        """Maps MLP output rows to tokens, score, bucket and probabilities."""
        out = raw.astype(np.float64)
        boundaries = np.asarray(self.bucket_boundaries)
        probs = np.zeros((len(out), 0))
        if self.kind == "reg":
            score = out[:, 0]
            tokens = np.expm1(np.clip(score, 0.0, 12.0))
            bucket = np.searchsorted(boundaries, tokens, side="left")
        elif self.kind == "cls":
            z = out - out.max(axis=1, keepdims=True)
            e = np.exp(z)
            probs = e / e.sum(axis=1, keepdims=True)
            tokens = probs @ np.asarray(self.bucket_medians)
            score = probs @ np.arange(N_BUCKETS, dtype=np.float64)
            bucket = probs.argmax(axis=1)
        else:
            assert self.score_quantiles is not None and self.length_quantiles is not None
            score = out[:, 0]
            tokens = np.interp(score, self.score_quantiles, self.length_quantiles)
            bucket = np.searchsorted(boundaries, tokens, side="left")
        tokens = np.maximum(tokens, 1.0)
        dist = self.distribution
        return {
            "tokens": tokens,
            "score": score,
            "bucket": bucket.astype(np.int64),
            "probs": probs,
            "quantiles": np.zeros((len(out), 0)) if dist is None else dist.quantiles(tokens),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for i, (w, b) in enumerate(self.layers):
            arrays[f"w{i}"] = w.astype(np.float32)
            arrays[f"b{i}"] = b.astype(np.float32)
        if self.score_quantiles is not None and self.length_quantiles is not None:
            arrays["score_quantiles"] = self.score_quantiles.astype(np.float64)
            arrays["length_quantiles"] = self.length_quantiles.astype(np.float64)
        return arrays


@dataclass
class TargetHeads:
    """A target model's card and its loaded heads."""

    target_model: str
    card: dict[str, Any]
    heads: dict[str, Head]
    folder: Path
    """Where the card lives: its relative paths (weights files) start here."""

    @property
    def default_head(self) -> str:
        return str(self.card["default_head"])

    @property
    def boundaries(self) -> list[float]:
        return [float(b) for b in self.card["bucket_boundaries"]]


def load_target(folder: Path) -> TargetHeads:
    """Reads ``card.json`` and every head's ``.npz`` in a target's folder."""
    card = json.loads((folder / "card.json").read_text())
    distributions = distributions_of(card)
    heads: dict[str, Head] = {}
    for name, info in card["heads"].items():
        with np.load(folder / info["file"]) as data:
            n_layers = sum(1 for k in data.files if k.startswith("w"))
            layers = [(data[f"w{i}"], data[f"b{i}"]) for i in range(n_layers)]
            sq = data["score_quantiles"] if "score_quantiles" in data.files else None
            lq = data["length_quantiles"] if "length_quantiles" in data.files else None
        heads[name] = Head(
            kind=name,
            version=str(info["version"]),
            layers=layers,
            bucket_boundaries=[float(b) for b in card["bucket_boundaries"]],
            bucket_medians=[float(m) for m in card["bucket_medians"]],
            score_quantiles=sq,
            length_quantiles=lq,
            metrics={k: float(v) for k, v in info.get("test_metrics", {}).items()},
            distribution=distributions.get(name),
        )
    return TargetHeads(
        target_model=str(card["target_model"]), card=card, heads=heads, folder=folder
    )


def load_all(heads_dir: Path) -> dict[str, TargetHeads]:
    """Every target folder (one holding a ``card.json``) under ``heads_dir``."""
    out: dict[str, TargetHeads] = {}
    if not heads_dir.is_dir():
        return out
    for folder in sorted(heads_dir.iterdir()):
        if (folder / "card.json").is_file():
            target = load_target(folder)
            out[target.target_model] = target
    return out
