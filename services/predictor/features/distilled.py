"""MiniLM with tuned weights applied (feature kind ``minilm-tuned``): the distilled heads.

A card whose ``encoder`` section names a ``layers_file`` (relative to the card's
folder) reads MiniLM's features after those weights are applied: the low-rank
delta distilled from SmolLM2 (``training/distill.py``, shipped in
``artifacts/heads_distilled/encoder``) or fine-tuned top layers (``.pt``).
Targets whose cards name one file share one encoder.

The tuned encoder is built as its own :class:`MiniLMEncoder` with the weights
applied before its trace and ONNX graph are made, rather than as a ``deepcopy``
of the stock encoder: the copy had to patch private state (a new lock, a
second trace and graph after the base ones), while a fresh load reads the same
files and gives the same weights, so the features are the same; it costs one
more read of MiniLM's 90 MB, once at start.

Its pooled vector is not all-MiniLM-L6-v2's sentence embedding (median cosine
0.73 for the distilled one), so it hands back no embedding: the core asks the
stock encoder for that, and only when a caller reads it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

from services.predictor.features.extractor import BuildContext, Card, FeatureBatch
from services.predictor.features.minilm import MiniLMFeatures, build_encoder

KIND = "minilm-tuned"


def weights_path(card: Card, folder: Path) -> Path:
    """The tuned weights a card names, resolved against the card's folder."""
    return (folder / str(card["encoder"]["layers_file"])).resolve()


class TunedMiniLMFeatures(MiniLMFeatures):
    """MiniLM's multi-layer features under tuned weights; no sentence embedding."""

    def features(self, texts: Sequence[str]) -> FeatureBatch:
        return FeatureBatch(self.encoder.encode_features(texts, self.batch_rows)[1], None)


class TunedKind:
    def key(self, card: Card, folder: Path) -> Hashable:
        return weights_path(card, folder)

    def build(self, card: Card, folder: Path, context: BuildContext) -> TunedMiniLMFeatures:
        encoder = build_encoder(context, tuned_weights=weights_path(card, folder))
        return TunedMiniLMFeatures(encoder, context.settings.batch_rows)
