"""The scheduler's online accuracy on windows small enough to check by hand, its
bounds (window, targets, groups), and the gauges it exports (series of groups that
left the window removed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.scheduler import metrics
from services.scheduler.core.accuracy import GroupAccuracy, OnlineAccuracy, order_gain
from shortline.common.stats import kendall_tau


def only(groups: list[GroupAccuracy], source: str = "predictor") -> GroupAccuracy:
    (g,) = [g for g in groups if g.source == source]
    return g


def test_perfect_ranking_scores_one_and_its_mae_is_exact() -> None:
    acc = OnlineAccuracy()
    # Twice too long, in the right order: tau 1, MAE the mean of 10, 20, 30, 40.
    for actual in (10, 20, 30, 40):
        acc.observe("llama", "predictor", "v1", 2 * actual, actual)
    g = only(acc.compute())
    assert (g.target, g.head, g.requests, g.share) == ("llama", "v1", 4, 1.0)
    assert g.kendall_tau == 1.0
    assert g.mae_tokens == 25.0
    assert g.order_gain == 1.0


def test_reversed_ranking_scores_minus_one() -> None:
    acc = OnlineAccuracy()
    for predicted, actual in ((40, 10), (30, 20), (20, 30), (10, 40)):
        acc.observe("llama", "predictor", "v1", predicted, actual)
    g = only(acc.compute())
    assert g.kendall_tau == -1.0
    assert g.mae_tokens == (30 + 10 + 10 + 30) / 4
    assert g.order_gain == -1.0


def test_order_gain_by_hand() -> None:
    def gain(predicted: list[float], actual: list[float]) -> float:
        return order_gain(np.array(predicted, dtype=float), np.array(actual, dtype=float))

    # Lengths 3, 1, 2 (6 tokens). Random order: each job waits for half of the
    # others, mean completion 6 * 4 / 6 = 4; the oracle's order 1, 2, 3: (1 + 3 + 6) / 3.
    assert gain([3, 1, 2], [3, 1, 2]) == pytest.approx(1.0)
    assert gain([1, 3, 2], [3, 1, 2]) == pytest.approx(-1.0)  # 3, 2, 1: 14 / 3
    assert gain([7, 7, 7], [3, 1, 2]) == pytest.approx(0.0)  # no order: chance
    # 1 first (alone), then 3 and 2 tied: completions 1, then 1 + 3 + 2 / 2 = 5 and
    # 1 + 2 + 3 / 2 = 4.5 on average: mean 3.5, (4 - 3.5) / (4 - 10 / 3) = 0.75.
    assert gain([5, 1, 5], [3, 1, 2]) == pytest.approx(0.75)
    assert math.isnan(gain([1, 2, 3], [4, 4, 4]))  # equal lengths: nothing to gain


def test_bucket_accuracy_uses_the_windows_quartiles() -> None:
    acc = OnlineAccuracy()
    # Actual 1..100: boundaries at p25/p50/p75/p99 = 25.75, 50.5, 75.25, 99.01.
    for actual in range(1, 101):
        predicted = actual if actual <= 50 else actual + 30  # 51..70 jump a bucket
        acc.observe("t", "predictor", "", predicted, actual)
    g = only(acc.compute())
    # Wrong: 51..75 (predicted 81..105: bucket 3 or 4, actual 2) and 76..99
    # (predicted past 99.01: bucket 4, actual 3). Right: 1..50, and 100 (4 and 4).
    assert g.bucket_accuracy == pytest.approx(51 / 100)
    assert g.head == "predictor"  # no version reported: the source


def test_groups_by_source_and_head_with_their_shares() -> None:
    acc = OnlineAccuracy()
    for i in range(6):
        acc.observe("t", "predictor", "v1", i, i)
    for i in range(3):
        acc.observe("t", "predictor", "v2", i, 2 - i)
    acc.observe("t", "fallback", "", 5, 1)
    groups = {(g.source, g.head): g for g in acc.compute()}
    assert set(groups) == {("predictor", "v1"), ("predictor", "v2"), ("fallback", "fallback")}
    assert groups["predictor", "v1"].share == 0.6
    assert groups["predictor", "v2"].kendall_tau == -1.0
    fallback = groups["fallback", "fallback"]
    assert fallback.share == 0.1 and math.isnan(fallback.kendall_tau)
    assert fallback.mae_tokens == 4.0


def test_the_window_keeps_only_the_last_requests() -> None:
    acc = OnlineAccuracy(window=50)
    for i in range(50):  # reversed, then pushed out by 50 perfectly ranked
        acc.observe("t", "predictor", "v", -i, i)
    assert only(acc.compute()).kendall_tau == -1.0
    for i in range(50):
        acc.observe("t", "predictor", "v", i, i)
    g = only(acc.compute())
    assert (g.requests, g.kendall_tau) == (50, 1.0)
    assert len(acc) == 50


def test_targets_and_groups_are_bounded() -> None:
    acc = OnlineAccuracy(window=20, max_targets=2, max_groups=2)
    for target in ("a", "b", "c", "d"):
        acc.observe(target, "predictor", "v", 1, 1)
    assert {g.target for g in acc.compute()} == {"a", "b", "other"}
    for i, head in enumerate(("v1", "v1", "v1", "v2", "v2", "v3", "v4")):
        acc.observe("a", "predictor", head, i, i)
    heads = {g.head: g.requests for g in acc.compute() if g.target == "a"}
    # v1 (3) and v2 (2) kept; v, v3, v4 (one each) pooled as "other".
    assert heads == {"v1": 3, "v2": 2, "other": 3}
    acc.observe("a", "made-up-source", "x", 1, 1)
    assert "made-up-source" not in {g.source for g in acc.compute()}


def test_only_dirty_targets_are_recomputed_and_the_tau_is_the_shared_one() -> None:
    acc = OnlineAccuracy()
    pairs = [(3, 1), (1, 2), (4, 3), (1, 5), (5, 9), (9, 2), (2, 6)]
    for p, a in pairs:
        acc.observe("t", "predictor", "v", p, a)
    assert acc.dirty
    first = acc.compute()
    assert not acc.dirty and acc.compute() == first
    assert only(first).kendall_tau == kendall_tau([p for p, _ in pairs], [a for _, a in pairs])


def test_export_sets_the_gauges_and_removes_groups_gone() -> None:
    def value(name: str, head: str) -> float | None:
        labels = {"model": "exp-target", "source": "predictor", "head": head}
        return metrics.REGISTRY.get_sample_value(name, labels)

    acc = OnlineAccuracy(window=4)
    for actual in (10, 20, 30, 40):
        acc.observe("exp-target", "predictor", "old", actual, actual)
    metrics.export_accuracy(acc.compute())
    assert value("shortline_prediction_kendall_tau", "old") == 1.0
    assert value("shortline_prediction_window_requests", "old") == 4
    assert value("shortline_prediction_mae_tokens", "old") == 0.0
    assert value("shortline_prediction_bucket_accuracy_ratio", "old") == 1.0
    for actual in (10, 20, 30, 40):  # the window now holds only "new"
        acc.observe("exp-target", "predictor", "new", 50 - actual, actual)
    metrics.export_accuracy(acc.compute())
    assert value("shortline_prediction_kendall_tau", "new") == -1.0
    assert value("shortline_prediction_kendall_tau", "old") is None
    assert value("shortline_prediction_window_requests", "old") is None
    metrics.export_accuracy([])
