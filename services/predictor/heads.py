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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

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
        return {
            "tokens": np.maximum(tokens, 1.0),
            "score": score,
            "bucket": bucket.astype(np.int64),
            "probs": probs,
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
