"""How well the length predictions ranked and sized the requests that really ran.

The predictor's card says how a head did on a held-out set; traffic drifts away
from any held-out set, and only the scheduler sees the truth (each finished
request's actual length beside the prediction it was queued by). This keeps, per
target model (the ``length_model`` whose head predicted), a sliding window of the
last ``window`` requests that ended on their own (``stop`` or ``length``: a
cancelled or failed request's length says nothing about its prompt), and reports
for each (prediction source, head) group in it:

- Kendall's tau of predicted against actual lengths (``shortline.common.stats``,
  the one the cards use): the order is what shortest-job-first needs;
- the mean absolute error in tokens;
- bucket accuracy: the share of requests whose prediction falls in the same
  length bucket as their actual length, the buckets being the window's own
  actual-length quartiles and 99th percentile (the percentiles the heads'
  buckets use, 25/50/75/99, so five buckets), so that a drifted scale shows
  even when the order holds;
- the group's share of the window: the fallback and cache shares;
- the order gain: the share of the oracle's gain over a random order (what FCFS is
  when lengths are independent of arrivals) that serving the group's requests in
  the order of their predictions captures, were they all queued together on one
  server (mean completion in tokens; tied predictions in random order). 1 is the
  oracle's order, 0 no better than chance (a constant fallback), -1 reversed. A
  closed form on the window, not a replay in the simulator: arrivals, batching
  and preemption are left out.

Pure and clock-free: the service decides when to :meth:`OnlineAccuracy.compute`
(a timer, not every request: tau over 500 costs about a millisecond).
Bounded: ``max_targets`` targets (the rest pooled as ``other``), ``window``
requests each, ``max_groups`` exported groups per target (the smallest of the
rest pooled under head ``other``).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from shortline.common.labels import OTHER
from shortline.common.stats import kendall_tau

WINDOW = 500
MAX_TARGETS = 16
MAX_GROUPS = 8
NATURAL_ENDS = frozenset({"stop", "length"})
BUCKET_PERCENTILES = (25.0, 50.0, 75.0, 99.0)
SOURCES = frozenset({"predictor", "cache", "fallback", "oracle", "hint"})


@dataclass(frozen=True)
class GroupAccuracy:
    """One (target, source, head) group of a target's window."""

    target: str
    source: str
    head: str
    requests: int
    share: float  # of the target's window
    kendall_tau: float  # NaN below two requests
    mae_tokens: float
    bucket_accuracy: float
    order_gain: float  # NaN when every length is the same (no order to gain)


def order_gain(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of the oracle's mean-completion gain over a random order that the
    predictions' order captures (see the module's docstring), in O(n log n)."""
    n = actual.shape[0]
    total = float(actual.sum())
    random = total * (n + 1) / (2 * n)  # each job waits for half of the others
    oracle = float(np.cumsum(np.sort(actual)).mean())
    if n < 2 or random - oracle <= 1e-12 * random:
        return float("nan")
    order = np.argsort(predicted, kind="stable")
    p, a = predicted[order], actual[order]
    new_group = np.r_[True, p[1:] != p[:-1]]
    group = np.cumsum(new_group) - 1
    sums = np.add.reduceat(a, np.flatnonzero(new_group))
    before = np.cumsum(sums) - sums  # the tokens of every group predicted shorter
    # In a group of tied predictions a job waits, on average, for half of the others.
    by_prediction = float((before[group] + a + (sums[group] - a) / 2).mean())
    return (random - by_prediction) / (random - oracle)


class OnlineAccuracy:
    def __init__(
        self, window: int = WINDOW, max_targets: int = MAX_TARGETS, max_groups: int = MAX_GROUPS
    ) -> None:
        if window < 2 or max_targets < 1 or max_groups < 1:
            raise ValueError("window >= 2, max_targets >= 1 and max_groups >= 1")
        self.window = window
        self.max_targets = max_targets
        self.max_groups = max_groups
        # target -> (source, head, predicted, actual), oldest first
        self._windows: dict[str, deque[tuple[str, str, float, float]]] = {}
        self._dirty: set[str] = set()
        self._report: dict[str, list[GroupAccuracy]] = {}

    def observe(self, target: str, source: str, head: str, predicted: float, actual: float) -> None:
        """One finished request with a natural end (the caller filters on
        :data:`NATURAL_ENDS` and a known prediction)."""
        if target not in self._windows and len(self._windows) >= self.max_targets:
            target = OTHER
        rows = self._windows.get(target)
        if rows is None:
            rows = self._windows[target] = deque(maxlen=self.window)
        source = source if source in SOURCES else OTHER
        rows.append((source, head or source, float(predicted), float(actual)))
        self._dirty.add(target)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def __len__(self) -> int:
        """Requests held, over every target."""
        return sum(len(rows) for rows in self._windows.values())

    def compute(self) -> list[GroupAccuracy]:
        """Every group's figures, recomputing only the targets observed since the
        last call."""
        for target in self._dirty:
            self._report[target] = self._compute(target, self._windows[target])
        self._dirty.clear()
        return [g for target in sorted(self._report) for g in self._report[target]]

    def _compute(
        self, target: str, rows: deque[tuple[str, str, float, float]]
    ) -> list[GroupAccuracy]:
        predicted = np.fromiter((r[2] for r in rows), np.float64, len(rows))
        actual = np.fromiter((r[3] for r in rows), np.float64, len(rows))
        boundaries = np.percentile(actual, BUCKET_PERCENTILES)
        same_bucket = np.searchsorted(boundaries, predicted, side="left") == np.searchsorted(
            boundaries, actual, side="left"
        )
        counts = Counter((r[0], r[1]) for r in rows)
        kept = set(sorted(counts, key=lambda k: (-counts[k], k))[: self.max_groups])
        keys = [(s, h) if (s, h) in kept else (s, OTHER) for s, h, _, _ in rows]
        groups = sorted(set(keys))
        index = {key: i for i, key in enumerate(groups)}
        codes = np.fromiter((index[k] for k in keys), np.int64, len(keys))
        out = []
        for i, key in enumerate(groups):
            mask = codes == i
            p, a = predicted[mask], actual[mask]
            n = int(mask.sum())
            out.append(
                GroupAccuracy(
                    target=target,
                    source=key[0],
                    head=key[1],
                    requests=n,
                    share=n / len(rows),
                    kendall_tau=kendall_tau(p, a) if n >= 2 else float("nan"),
                    mae_tokens=float(np.abs(p - a).mean()),
                    bucket_accuracy=float(same_bucket[mask].mean()),
                    order_gain=order_gain(p, a),
                )
            )
        return out
