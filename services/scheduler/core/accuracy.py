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
  and preemption are left out; it is cheap and follows every recomputation;
- the replayed order gain (``replayed_order_gain``): the same share, but from the
  window replayed in the simulator at its arrival times on the deployment's workers
  with the scheduler's own policy (``services/scheduler/sim/replay.py``, whose
  docstring defines a group's figure). Slower, so the service runs it on its own
  timer, off the event loop: each window keeps what a replay needs (arrival time on
  the scheduler's clock, the last run's seconds and tokens for the time per token),
  :meth:`OnlineAccuracy.replay_windows` copies it out and
  :meth:`OnlineAccuracy.set_replayed` takes the figures back (NaN until then; the
  last replay's figure until the next).

Pure and clock-free: the service decides when to :meth:`OnlineAccuracy.compute`
(a timer, not every request: tau over 500 costs about a millisecond) and when to
replay.
Bounded: ``max_targets`` targets (the rest pooled as ``other``), ``window``
requests each, ``max_groups`` exported groups per target (the smallest of the
rest pooled under head ``other``).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, replace

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
    replayed_order_gain: float = math.nan  # NaN until a replay of the window reports


@dataclass(frozen=True)
class ReplayWindow:
    """A copy of one target's window with what a replay needs, oldest first."""

    target: str
    groups: list[tuple[str, str]]  # (source, head) by group code
    codes: np.ndarray  # each request's group code
    arrival: np.ndarray  # seconds, the scheduler's clock
    predicted: np.ndarray
    actual: np.ndarray
    token_time_s: float  # run seconds per generated token over the window; 0: unknown


# (source, head, predicted, actual, arrival, last run's seconds, last run's tokens)
Row = tuple[str, str, float, float, float, float, float]


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
        self._windows: dict[str, deque[Row]] = {}  # oldest first
        self._dirty: set[str] = set()
        self._report: dict[str, list[GroupAccuracy]] = {}
        self._unreplayed: set[str] = set()
        self._replayed: dict[str, dict[tuple[str, str], float]] = {}

    def observe(
        self,
        target: str,
        source: str,
        head: str,
        predicted: float,
        actual: float,
        arrival: float = math.nan,
        run_seconds: float = math.nan,
        run_tokens: float = 0.0,
    ) -> None:
        """One finished request with a natural end (the caller filters on
        :data:`NATURAL_ENDS` and a known prediction). ``arrival`` (the scheduler's
        clock) and the last run's ``run_seconds`` and ``run_tokens`` are what a replay
        needs; a request without an arrival is left out of replays."""
        if target not in self._windows and len(self._windows) >= self.max_targets:
            target = OTHER
        rows = self._windows.get(target)
        if rows is None:
            rows = self._windows[target] = deque(maxlen=self.window)
        source = source if source in SOURCES else OTHER
        rows.append(
            (
                source,
                head or source,
                float(predicted),
                float(actual),
                float(arrival),
                float(run_seconds),
                float(run_tokens),
            )
        )
        self._dirty.add(target)
        self._unreplayed.add(target)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    @property
    def unreplayed(self) -> bool:
        """A request ended since the last :meth:`replay_windows`."""
        return bool(self._unreplayed)

    def replay_windows(self) -> list[ReplayWindow]:
        """Copies of the windows that changed since the last call (their requests
        with an arrival time), grouped as :meth:`compute` groups them."""
        out = []
        for target in sorted(self._unreplayed):
            window = self._windows[target]
            groups, codes = self._grouping(window)  # the groups compute() reports
            keep = [i for i, r in enumerate(window) if not math.isnan(r[4])]
            if not keep:
                continue
            rows = [window[i] for i in keep]
            codes = codes[keep]
            seconds = sum(r[5] for r in rows if r[6] > 0.0 and r[5] >= 0.0)
            tokens = sum(r[6] for r in rows if r[6] > 0.0 and r[5] >= 0.0)
            out.append(
                ReplayWindow(
                    target=target,
                    groups=groups,
                    codes=codes,
                    arrival=np.fromiter((r[4] for r in rows), np.float64, len(rows)),
                    predicted=np.fromiter((r[2] for r in rows), np.float64, len(rows)),
                    actual=np.fromiter((r[3] for r in rows), np.float64, len(rows)),
                    token_time_s=seconds / tokens if tokens > 0.0 else 0.0,
                )
            )
        self._unreplayed.clear()
        return out

    def set_replayed(self, target: str, gains: dict[tuple[str, str], float]) -> None:
        """A replay's figures for ``target``'s groups (by (source, head)); they stay
        until the next replay's."""
        self._replayed[target] = dict(gains)
        report = self._report.get(target)
        if report is not None:
            self._report[target] = [self._with_replayed(target, g) for g in report]

    def _with_replayed(self, target: str, g: GroupAccuracy) -> GroupAccuracy:
        gain = self._replayed.get(target, {}).get((g.source, g.head), math.nan)
        return replace(g, replayed_order_gain=gain)

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

    def _grouping(self, rows: Iterable[Row]) -> tuple[list[tuple[str, str]], np.ndarray]:
        """The window's (source, head) groups, the smallest past ``max_groups`` pooled
        under head ``other``, and each request's group code."""
        pairs = [(r[0], r[1]) for r in rows]
        counts = Counter(pairs)
        kept = set(sorted(counts, key=lambda k: (-counts[k], k))[: self.max_groups])
        keys = [(s, h) if (s, h) in kept else (s, OTHER) for s, h in pairs]
        groups = sorted(set(keys))
        index = {key: i for i, key in enumerate(groups)}
        return groups, np.fromiter((index[k] for k in keys), np.int64, len(keys))

    def _compute(self, target: str, rows: deque[Row]) -> list[GroupAccuracy]:
        predicted = np.fromiter((r[2] for r in rows), np.float64, len(rows))
        actual = np.fromiter((r[3] for r in rows), np.float64, len(rows))
        boundaries = np.percentile(actual, BUCKET_PERCENTILES)
        same_bucket = np.searchsorted(boundaries, predicted, side="left") == np.searchsorted(
            boundaries, actual, side="left"
        )
        groups, codes = self._grouping(rows)
        replayed = self._replayed.get(target, {})
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
                    replayed_order_gain=replayed.get(key, math.nan),
                )
            )
        return out
