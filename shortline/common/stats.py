"""Statistics every part of the project computes the same way, in plain numpy.

One copy of each: the predictor's evaluation, its training, the simulator
and the benchmark all rank predictions with this Kendall's tau, so a figure
in a head's card and one in a benchmark table mean the same thing. Kendall's
tau is the one that matters for scheduling: SJF only needs the order of jobs
right, not their lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties get their average rank (as scipy's default)."""
    arr = np.asarray(values, dtype=np.float64)
    order = np.argsort(arr, kind="mergesort")
    sorted_vals = arr[order]
    ranks = np.empty(len(arr), dtype=np.float64)
    start = 0
    n = len(arr)
    while start < n:
        end = start
        while end + 1 < n and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable handled), O(n^2) which is fine for n < 10^4.

    A constant side orders nothing, so it scores 0 (scipy says nan): the mean
    baseline then reads as "no ranking information" in the tables.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-d arrays of equal length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return 0.0
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), k=1)
    sa, sb = da[iu], db[iu]
    concordance = float((sa * sb).sum())
    pairs_a = float(np.count_nonzero(sa))
    pairs_b = float(np.count_nonzero(sb))
    if pairs_a == 0 or pairs_b == 0:
        return 0.0
    return concordance / np.sqrt(pairs_a * pairs_b)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    ra, rb = rankdata(x), rankdata(y)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])
