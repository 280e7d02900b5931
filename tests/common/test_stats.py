"""The shared statistics against values worked out by hand, and Kendall's tau against its
pairwise definition and scipy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats as scipy_stats

from shortline.common.stats import (
    add_ratios,
    completion_stats,
    kendall_tau,
    oracle_share,
    percentile,
)


def pairwise_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b pair by pair, the O(n^2) definition (and the expression it used)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2:
        return 0.0
    iu = np.triu_indices(len(a), k=1)
    sa = np.sign(a[:, None] - a[None, :])[iu]
    sb = np.sign(b[:, None] - b[None, :])[iu]
    pairs_a, pairs_b = float(np.count_nonzero(sa)), float(np.count_nonzero(sb))
    if pairs_a == 0 or pairs_b == 0:
        return 0.0
    return float((sa * sb).sum()) / np.sqrt(pairs_a) / np.sqrt(pairs_b)


def test_percentile_interpolates_linearly_between_samples() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    # Position 0.99 x 3 = 2.97: 3 + 0.97 x (4 - 3).
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile(np.array([7.0]), 99) == 7.0
    assert isinstance(percentile([1, 2], 50), float)


def test_kendall_tau_of_a_hand_counted_ranking() -> None:
    # One of six pairs (2, 3) is discordant: (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties: x ties (0, 1), y ties (1, 2); the other 4 pairs concordant -> 4 / sqrt(5 x 5).
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)


def test_kendall_tau_edge_cases() -> None:
    assert kendall_tau([], []) == 0.0
    assert kendall_tau([3.0], [1.0]) == 0.0
    # A constant side orders nothing: 0, where scipy says nan.
    assert kendall_tau([5, 5, 5], [1, 2, 3]) == 0.0
    assert kendall_tau([1, 2, 3], [2, 2, 2]) == 0.0
    # A NaN propagates, as in scipy's default.
    assert math.isnan(kendall_tau([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(kendall_tau([1.0, 2.0, 3.0], [1.0, 2.0, np.nan]))
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau([1, 2, 3], [1, 2])


def test_kendall_tau_counts_exactly_what_the_pairwise_definition_sums() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(2, 80))
        k = int(rng.integers(1, 10))
        x = rng.integers(0, k, n).astype(float) if rng.random() < 0.7 else rng.normal(size=n)
        y = rng.integers(0, k, n).astype(float) if rng.random() < 0.7 else rng.normal(size=n)
        assert kendall_tau(x, y) == pytest.approx(pairwise_tau(x, y), abs=1e-15), (x, y)
        if len(set(x)) > 1 and len(set(y)) > 1:
            # Bit for bit scipy's tau-b, which the simulator and benchmark called before.
            assert kendall_tau(x, y) == float(scipy_stats.kendalltau(x, y).statistic), (x, y)


def test_kendall_tau_matches_scipys_tau_b_at_trace_size() -> None:
    rng = np.random.default_rng(11)
    true = rng.integers(1, 1500, size=20_000).astype(float)  # many ties, as token counts
    predicted = np.round(true * np.exp(0.8 * rng.standard_normal(true.shape[0])), -1)
    got = kendall_tau(predicted, true)
    assert got == pytest.approx(scipy_stats.kendalltau(predicted, true).statistic, abs=1e-12)
    assert 0.3 < got < 0.8


def test_completion_stats_over_a_hand_made_run() -> None:
    got = completion_stats(
        arrival=np.array([0.0, 1.0, 2.0, 3.0]),
        wait=np.array([0.0, 0.25, 1.5, np.nan]),
        first_token=np.array([0.5, 1.5, 4.0, np.nan]),
        finish=np.array([2.0, 3.0, 6.0, np.nan]),  # the last request never finished
        tokens=np.array([10, 20, 30, 40]),
    )
    # JCTs 2, 2, 4; TTFTs 0.5, 0.5, 2; waits 0, 0.25, 1.5; span 0 -> 6 s.
    assert got["requests"] == 3
    assert got["mean_jct_s"] == pytest.approx(8 / 3)
    assert got["p50_jct_s"] == pytest.approx(2.0)
    assert got["p99_jct_s"] == pytest.approx(2.0 + 0.98 * 2.0)
    assert got["mean_wait_s"] == pytest.approx(1.75 / 3)
    assert got["p99_wait_s"] == pytest.approx(0.25 + 0.98 * 1.25)
    assert got["mean_ttft_s"] == pytest.approx(1.0)
    assert got["p99_ttft_s"] == pytest.approx(0.5 + 0.98 * 1.5)
    assert got["throughput_rps"] == pytest.approx(3 / 6)
    assert got["throughput_tps"] == pytest.approx(60 / 6)


def test_oracle_share_is_the_fraction_of_the_oracles_gain() -> None:
    assert oracle_share(10.0, 8.0, 6.0) == pytest.approx(0.5)
    assert oracle_share(10.0, 5.0, 6.0) == pytest.approx(1.25)
    assert oracle_share(10.0, 11.0, 6.0) == pytest.approx(-0.25)
    assert math.isnan(oracle_share(10.0, 9.0, 10.0))


def _rows() -> list[dict[str, Any]]:
    return [
        {"policy": "fcfs", "batching": "none", "mean_jct_s": 10.0, "tps": 50.0},
        {"policy": "ssjf", "batching": "none", "mean_jct_s": 7.0, "tps": 45.0},
        {"policy": "sjf-oracle", "batching": "none", "mean_jct_s": 6.0, "tps": 50.0},
        {"policy": "fcfs", "batching": "continuous", "mean_jct_s": 4.0, "tps": 0.0},
        {"policy": "ssjf", "batching": "continuous", "mean_jct_s": 3.0},
        {"policy": "ssjf", "batching": "dynamic", "mean_jct_s": 5.0, "tps": 1.0},
    ]


def test_add_ratios_divides_by_the_reference_of_the_same_group() -> None:
    rows = _rows()
    add_ratios(rows, ("batching",), {"mean_jct_s": "mean_vs", "tps": "tps_vs"})
    assert rows[0]["mean_vs"] == 1.0
    assert rows[1]["mean_vs"] == pytest.approx(0.7)
    assert rows[1]["tps_vs"] == pytest.approx(0.9)
    assert rows[4]["mean_vs"] == pytest.approx(0.75)
    # The reference's 0 and a value the row lacks give NaN, not an error.
    assert math.isnan(rows[3]["tps_vs"]) and math.isnan(rows[4]["tps_vs"])
    # No fcfs row in the group: left alone. No oracle asked for: no oracle share.
    assert "mean_vs" not in rows[5]
    assert all("oracle_share" not in r for r in rows)


def test_add_ratios_with_an_oracle_adds_its_share_of_the_gain() -> None:
    rows = _rows()
    add_ratios(rows, ("batching",), {"mean_jct_s": "mean_vs"}, oracle="sjf-oracle")
    # (10 - 7) / (10 - 6) of the oracle's gain.
    assert rows[1]["oracle_share"] == pytest.approx(0.75)
    assert rows[2]["oracle_share"] == pytest.approx(1.0)
    assert math.isnan(rows[4]["oracle_share"])  # no oracle in that group
    assert "oracle_share" not in rows[5]


def test_add_ratios_groups_by_every_key_given() -> None:
    rows = [
        {"policy": "fcfs", "batching": "none", "rho": 0.5, "mean_jct_s": 2.0},
        {"policy": "fcfs", "batching": "none", "rho": 0.9, "mean_jct_s": 8.0},
        {"policy": "ssjf", "batching": "none", "rho": 0.5, "mean_jct_s": 1.0},
        {"policy": "ssjf", "batching": "none", "rho": 0.9, "mean_jct_s": 6.0},
    ]
    add_ratios(rows, ("batching", "rho"), {"mean_jct_s": "mean_jct_vs_fcfs"}, reference="fcfs")
    assert [r["mean_jct_vs_fcfs"] for r in rows] == [1.0, 1.0, 0.5, 0.75]
