"""The simulator's calibration on live cells: step fit, run overhead, join delay."""

from __future__ import annotations

import numpy as np
import pytest

from shortline.benchmark.calibration import fit_step, join_delay, run_overhead
from shortline.benchmark.summary import RequestTimes


def test_run_overhead_is_the_gap_between_back_to_back_runs_beyond_their_tokens() -> None:
    tokens = np.array([10, 20, 30, 10, 10, 10, 40])
    arrival = np.zeros(7)
    arrival[6] = 5.0  # arrives to an idle worker: not a back-to-back run
    finish = np.zeros(7)
    t = 0.0
    for i, n in enumerate(tokens):
        t = max(t, arrival[i]) + 0.02 + n * 0.01
        finish[i] = t
    times = RequestTimes(arrival, finish - 0.01, finish, tokens, np.zeros(7))
    assert run_overhead(times, 0.01) == pytest.approx(0.02)


def test_fit_step_recovers_a_and_b_from_overlapping_runs() -> None:
    # Two runs alone (step a + b) and three together (step a + 3b), a = 10 ms, b = 2 ms.
    a, b = 0.010, 0.002
    first = np.array([0.0, 10.0, 20.0, 20.0, 20.0])
    tokens = np.array([101, 51, 201, 201, 201])
    steps = np.array([a + b, a + b, a + 3 * b, a + 3 * b, a + 3 * b])
    finish = first + (tokens - 1) * steps
    t = RequestTimes(first - 0.1, first, finish, tokens, np.zeros(5))
    got_a, got_b = fit_step([t])
    assert got_a == pytest.approx(a, rel=1e-6)
    assert got_b == pytest.approx(b, rel=1e-6)


def test_join_delay_is_dispatch_to_first_token_beyond_one_step() -> None:
    # Dispatched at arrival + wait; the first token 20 ms + one step later; step 15 ms.
    n = 9
    arrival = np.arange(n, dtype=np.float64)
    wait = np.full(n, 0.3)
    tokens = np.full(n, 41)
    first = arrival + wait + 0.020 + 0.015
    finish = first + 40 * 0.015
    first[0] += 1.0  # one outlier does not move the median
    times = RequestTimes(arrival, first, finish, tokens, wait)
    assert join_delay(times) == pytest.approx(0.020)
    # A first token sooner than one step after dispatch is no delay.
    early = RequestTimes(arrival, arrival + wait + 0.005, finish, tokens, wait)
    assert join_delay(early) == 0.0
