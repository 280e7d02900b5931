"""Semantic cache of observed output lengths.

A prompt whose embedding (the predictor returns it, normalised) lies within a
cosine threshold of a recently completed prompt for the same target model is
given that prompt's observed length instead of the prediction: near-repeats
are common in production traffic, and an observation beats a guess.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


class _Table:
    """Embeddings of one target model: a fixed matrix, evicted least recently used."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.lengths = np.zeros(capacity, dtype=np.float64)
        self.last_used = np.zeros(capacity, dtype=np.int64)
        self.size = 0


class SemanticCache:
    def __init__(self, threshold: float = 0.95, capacity: int = 4096) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"cache threshold must be a cosine in [-1, 1], got {threshold}")
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.threshold = threshold
        self.capacity = capacity
        self._tables: dict[str, _Table] = {}
        self._tick = 0
        self.lookups = 0
        self.hits = 0

    @staticmethod
    def _unit(embedding: NDArray[np.floating] | list[float]) -> NDArray[np.float32]:
        v = np.asarray(embedding, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def lookup(self, model: str, embedding: NDArray[np.floating] | list[float]) -> float | None:
        """Observed length of the nearest cached prompt, if it is near enough."""
        self.lookups += 1
        table = self._tables.get(model)
        if table is None or table.size == 0:
            return None
        v = self._unit(embedding)
        if v.shape[0] != table.vectors.shape[1]:
            return None
        sims = table.vectors[: table.size] @ v
        best = int(np.argmax(sims))
        if float(sims[best]) < self.threshold:
            return None
        self._tick += 1
        table.last_used[best] = self._tick
        self.hits += 1
        return float(table.lengths[best])

    def insert(
        self, model: str, embedding: NDArray[np.floating] | list[float], length: float
    ) -> None:
        v = self._unit(embedding)
        table = self._tables.get(model)
        if table is None:
            table = self._tables[model] = _Table(self.capacity, v.shape[0])
        if v.shape[0] != table.vectors.shape[1]:
            return
        self._tick += 1
        if table.size:
            # The same prompt again: refresh its length rather than holding two rows.
            sims = table.vectors[: table.size] @ v
            best = int(np.argmax(sims))
            if float(sims[best]) >= 0.9999:
                table.lengths[best] = length
                table.last_used[best] = self._tick
                return
        if table.size < self.capacity:
            row = table.size
            table.size += 1
        else:
            row = int(np.argmin(table.last_used))
        table.vectors[row] = v
        table.lengths[row] = length
        table.last_used[row] = self._tick

    def __len__(self) -> int:
        return sum(t.size for t in self._tables.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
