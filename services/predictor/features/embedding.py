"""Heads fitted on the 384-d sentence embedding (feature kind ``minilm-embedding``).

``shortline predictor train --from-log`` on a digest outcome log has no prompt
text, only the embedding the predictor returned: such heads read that embedding,
so the stock encoder serves them, handing back the same vector as features and
as the response's embedding.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

from services.predictor.features.extractor import BuildContext, Card, FeatureBatch
from services.predictor.features.minilm import MiniLMFeatures, build_encoder
from services.predictor.features.minilm_backends import EMBEDDING_DIM

KIND = "minilm-embedding"


class EmbeddingFeatures(MiniLMFeatures):
    @property
    def feature_dim(self) -> int:
        return EMBEDDING_DIM

    def features(self, texts: Sequence[str]) -> FeatureBatch:
        embeddings = self.encoder.encode(texts, batch_size=self.batch_rows)
        return FeatureBatch(embeddings, embeddings)


class EmbeddingKind:
    def key(self, card: Card, folder: Path) -> Hashable:
        return KIND

    def build(self, card: Card, folder: Path, context: BuildContext) -> EmbeddingFeatures:
        return EmbeddingFeatures(build_encoder(context), context.settings.batch_rows)
