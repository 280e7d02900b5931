"""LengthDistribution: a known log-normal's quantiles give back its moments; the shape
rules (monotone, finite tail, repaired crossings); the Gittins key of a survivor."""

from __future__ import annotations

import math
from itertools import pairwise
from statistics import NormalDist

import pytest

from shortline.common.length_distribution import (
    QUANTILE_LEVELS,
    DistributionError,
    LengthDistribution,
    as_distribution,
    lognormal_quantiles,
)

MEDIAN = 200.0
SIGMA = 0.5


def lognormal_remaining(g: float, median: float = MEDIAN, sigma: float = SIGMA) -> float:
    """E[X - g | X > g] of a log-normal, in closed form."""
    mu = math.log(median)
    n = NormalDist()
    z = (math.log(g) - mu) / sigma
    return math.exp(mu + sigma * sigma / 2) * n.cdf(sigma - z) / (1 - n.cdf(z)) - g


def test_quantiles_are_kept_at_their_levels() -> None:
    d = LengthDistribution.lognormal(MEDIAN, SIGMA)
    for level, q in zip(QUANTILE_LEVELS, d.quantiles, strict=True):
        assert d.cdf(q) == pytest.approx(level, abs=1e-9)
        assert d.quantile(level) == pytest.approx(q, rel=1e-9)


def test_a_lognormal_gives_its_mean_and_conditional_remaining() -> None:
    d = LengthDistribution.lognormal(MEDIAN, SIGMA)
    assert d.mean == pytest.approx(MEDIAN * math.exp(SIGMA**2 / 2), rel=0.05)
    # Up to about the 0.7 quantile the log-linear interpolation is within 10%.
    for g in (1.0, 100.0, 150.0, 200.0, 250.0):
        assert d.expected_remaining(g) == pytest.approx(lognormal_remaining(g), rel=0.10), g


def test_cdf_and_quantile_are_monotone_and_inverse() -> None:
    d = LengthDistribution.lognormal(MEDIAN, 1.0)
    xs = [1.0 + 3.0 * i for i in range(2000)]
    cdf = [d.cdf(x) for x in xs]
    assert all(b >= a for a, b in pairwise(cdf))
    assert cdf[0] >= 0.0 and cdf[-1] < 1.0
    for u in (0.01, 0.2, 0.5, 0.95, 0.995, 0.9999):
        assert d.cdf(d.quantile(u)) == pytest.approx(u, abs=1e-9)


def test_the_tail_is_exponential_so_a_survivor_keeps_a_bounded_remaining() -> None:
    d = LengthDistribution.lognormal(MEDIAN, SIGMA)
    q99 = d.quantiles[-1]
    far = [d.expected_remaining(q99 * k) for k in (1.0, 2.0, 10.0, 100.0)]
    assert all(math.isfinite(r) and r > 0 for r in far)
    assert max(far) == pytest.approx(min(far), rel=1e-6)  # memoryless beyond q99


def test_gittins_key_of_a_job_past_its_bulk_grows() -> None:
    # A tight bulk around 100 with a long tail: at 0 the job is likely to end soon (small
    # key); once it has survived past the bulk only the tail is left (the index drops).
    d = LengthDistribution([90, 95, 100, 105, 110, 2000])
    assert d.gittins0 == d.gittins_key(0)
    assert d.gittins0 <= d.mean
    assert d.gittins0 < 0.7 * d.mean  # the bulk (~100 / 0.9), not the mean, sets it
    assert d.gittins_key(150) > 5 * d.gittins0
    # Its expected remaining after the bulk is larger than at the start: it grew.
    assert d.expected_remaining(150) > d.expected_remaining(0)


def test_crossing_quantiles_are_repaired_and_bad_ones_refused() -> None:
    d = LengthDistribution([50, 40, 100, 90, 300, 1000])
    assert list(d.quantiles) == sorted(d.quantiles)
    with pytest.raises(DistributionError):
        LengthDistribution([1, 2, 3])
    with pytest.raises(DistributionError):
        LengthDistribution([1, 2, 3, 4, math.nan, 6])
    assert as_distribution([1, 2, 3]) is None
    assert as_distribution(None) is None


def test_a_cap_clips_the_tail() -> None:
    d = LengthDistribution(lognormal_quantiles(MEDIAN, SIGMA), cap=300)
    assert max(d.quantiles) == 300
    assert d.survival(300) == 0.0
    assert d.expected_remaining(250) < 50
    capped = as_distribution(LengthDistribution.lognormal(MEDIAN, SIGMA), cap=300)
    assert capped is not None and max(capped.quantiles) == 300


def test_tail_inflation_orders_a_heavier_tail_later() -> None:
    light = LengthDistribution.lognormal(100, 0.3)
    heavy = LengthDistribution.lognormal(100, 1.0)
    assert heavy.risk0 > light.risk0
    assert light.risk0 > light.mean  # inflated above the expectation


def test_scaled_divides_every_length() -> None:
    d = LengthDistribution.lognormal(MEDIAN, SIGMA)
    half = d.scaled(2.0)
    assert half.mean == pytest.approx(d.mean / 2, rel=1e-9)
