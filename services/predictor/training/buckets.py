"""Length buckets: where a target's train lengths put the boundaries, and which bucket a
length falls in (the ``cls`` head's classes and the bucket accuracy metric)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.predictor.heads import BUCKET_PERCENTILES, N_BUCKETS


def bucket_boundaries(train_tokens: np.ndarray | list[int]) -> list[float]:
    """Upper bounds of buckets 0..3 at the train lengths' p25/p50/p75/p99."""
    arr = np.asarray(train_tokens, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("need at least one train length to place bucket boundaries")
    return [float(v) for v in np.percentile(arr, BUCKET_PERCENTILES)]


def bucket_medians(train_tokens: np.ndarray | list[int], boundaries: list[float]) -> list[float]:
    """Median train length inside each bucket (the boundary midpoint if a bucket is empty)."""
    arr = np.asarray(train_tokens, dtype=np.float64)
    idx = np.searchsorted(np.asarray(boundaries), arr, side="left")
    edges = [0.0, *boundaries, float(arr.max()) if arr.size else boundaries[-1]]
    out = []
    for k in range(N_BUCKETS):
        members = arr[idx == k]
        out.append(float(np.median(members)) if members.size else (edges[k] + edges[k + 1]) / 2.0)
    return out


def bucket_of(tokens: Sequence[float] | np.ndarray, boundaries: Sequence[float]) -> np.ndarray:
    """Bucket index 0..len(boundaries): bucket k holds lengths <= boundaries[k]."""
    return np.searchsorted(np.asarray(boundaries, dtype=np.float64), tokens, side="left")
