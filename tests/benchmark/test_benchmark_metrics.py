"""The benchmark's numbers against values worked out by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from shortline.benchmark.metrics import (
    RequestTimes,
    add_ratios,
    goodput,
    oracle_share,
    paper_throughput,
    summarize,
)
from shortline.benchmark.workload import scale_lengths


def test_paper_throughput_counts_jobs_done_when_a_quarter_have_completed() -> None:
    arrival = np.array([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    finish = np.array([4.0, 1.0, 9.0, 2.0, 8.0, 7.0, 6.0, 5.0])
    # 25% of 8 = 2 jobs; the second completion is at t=2, the clock starts at t=0.
    assert paper_throughput(arrival, finish) == pytest.approx(2 / 2.0)


def test_paper_throughput_rewards_finishing_short_jobs_first() -> None:
    arrival = np.zeros(4)
    long_first = np.array([10.0, 11.0, 12.0, 13.0])
    short_first = np.array([1.0, 11.0, 12.0, 13.0])
    # Same makespan, same work: only the paper's metric tells them apart.
    assert paper_throughput(arrival, short_first) == pytest.approx(1.0)
    assert paper_throughput(arrival, long_first) == pytest.approx(0.1)


def test_paper_throughput_is_nan_when_too_few_jobs_finished() -> None:
    assert math.isnan(paper_throughput(np.zeros(4), np.array([np.nan] * 4)))


def test_oracle_share_is_the_fraction_of_the_oracles_gain() -> None:
    assert oracle_share(10.0, 8.0, 6.0) == pytest.approx(0.5)
    assert oracle_share(10.0, 5.0, 6.0) == pytest.approx(1.25)
    assert oracle_share(10.0, 11.0, 6.0) == pytest.approx(-0.25)
    assert math.isnan(oracle_share(10.0, 9.0, 10.0))


def test_goodput_counts_jobs_within_their_size_relative_slo() -> None:
    jct = np.array([1.0, 2.0, 10.0])
    tokens = np.array([10, 10, 100])
    # SLO = 3 x tokens x 0.05 s: 1.5 s, 1.5 s, 15 s -> jobs 0 and 2 meet it.
    rps, share = goodput(jct, tokens, 0.05, 3.0, span_s=10.0)
    assert rps == pytest.approx(0.2)
    assert share == pytest.approx(2 / 3)


def test_summarize_over_a_hand_made_run() -> None:
    t = RequestTimes(
        arrival=np.array([0.0, 1.0, 2.0, 3.0]),
        first_token=np.array([0.5, 1.5, 4.0, np.nan]),
        finish=np.array([2.0, 3.0, 6.0, np.nan]),
        tokens=np.array([10, 20, 30, 40]),
        wait=np.array([0.0, 0.25, 1.5, np.nan]),
        preemptions=np.array([0, 1, 0, 0]),
    )
    row = summarize(t, step_one_s=0.1, slo_factor=1.5)
    assert row["requests"] == 3 and row["unfinished"] == 1
    assert row["mean_jct_s"] == pytest.approx((2 + 2 + 4) / 3)
    assert row["p50_jct_s"] == pytest.approx(2.0)
    assert row["mean_ttft_s"] == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    assert row["mean_wait_s"] == pytest.approx(1.75 / 3)
    # Span: first arrival 0 to last finish 6.
    assert row["throughput_rps"] == pytest.approx(3 / 6)
    assert row["throughput_tps"] == pytest.approx(60 / 6)
    # SLO 1.5 x tokens x 0.1: 1.5, 3.0, 4.5 s -> jobs 1 and 2 meet it.
    assert row["goodput_rps"] == pytest.approx(2 / 6)
    assert row["preemptions"] == 1
    # One of four jobs done at t=2.
    assert row["paper_throughput_rps"] == pytest.approx(1 / 2)


def test_add_ratios_compares_within_each_group() -> None:
    rows: list[dict[str, Any]] = [
        {"policy": "fcfs", "batching": "none", "mean_jct_s": 10.0, "p99_jct_s": 40.0},
        {"policy": "ssjf", "batching": "none", "mean_jct_s": 7.0, "p99_jct_s": 60.0},
        {"policy": "sjf-oracle", "batching": "none", "mean_jct_s": 6.0, "p99_jct_s": 70.0},
        {"policy": "fcfs", "batching": "continuous", "mean_jct_s": 4.0, "p99_jct_s": 8.0},
        {"policy": "ssjf", "batching": "continuous", "mean_jct_s": 3.0, "p99_jct_s": 9.0},
    ]
    add_ratios(rows, ("batching",))
    assert rows[1]["mean_jct_vs_fcfs"] == pytest.approx(0.7)
    assert rows[1]["p99_jct_vs_fcfs"] == pytest.approx(1.5)
    assert rows[1]["oracle_share"] == pytest.approx(0.75)
    assert rows[4]["mean_jct_vs_fcfs"] == pytest.approx(0.75)
    assert math.isnan(rows[4]["oracle_share"])  # no oracle in that group


def test_scaled_lengths_round_and_never_reach_zero() -> None:
    got = scale_lengths(np.array([1, 4, 5, 15, 1000]), 10.0)
    assert got.tolist() == [1, 1, 1, 2, 100]
    with pytest.raises(ValueError, match="length scale"):
        scale_lengths(np.array([10]), 0.5)


def test_a_short_trace_sequence_runs_at_its_target_rate() -> None:
    from services.scheduler.sim.workload import LengthSet
    from shortline.benchmark.workload import LengthPool, build

    lengths = LengthSet(
        prompts=["a", "b", "c"],
        prompt_tokens=np.array([3, 4, 5]),
        true_tokens=np.array([100, 200, 300]),
        name="test",
    )
    pool = LengthPool(
        lengths, scale_lengths(lengths.true_tokens, 10), np.array([90.0, 210, 330]), 10
    )
    work = build(pool, n=50, rate=2.0, trace="conv", seed=3)
    assert work.arrivals[0] == 0.0
    assert work.arrivals[-1] == pytest.approx(49 / 2.0)
    gaps = np.diff(work.arrivals)
    assert gaps.std() / gaps.mean() > 0.5  # the trace's burstiness survives the rescaling
    # Each request carries its own prompt's scaled length and unscaled prediction.
    for i in range(50):
        j = work.unique_index[i]
        assert work.prompts[i] == lengths.prompts[j]
        assert work.true_tokens[i] == [10, 20, 30][j]
        assert work.predicted[i] == [90.0, 210, 330][j]
    sim = work.to_sim()
    # The simulated scheduler, like the benchmark-mode one, sees predictions in the
    # replayed lengths' unit, so remaining = predicted - generated is in one unit.
    assert sim.predicted.tolist() == (work.predicted / 10).tolist()
    assert sim.prompt_ids is not None and int(sim.prompt_ids.max()) < 50
    # The live client's max_tokens is the true length, which the benchmark-mode
    # scheduler does not cap predictions at: the simulator's copy carries no cap either.
    assert sim.max_tokens is None


def test_run_overhead_is_the_gap_between_back_to_back_runs_beyond_their_tokens() -> None:
    from shortline.benchmark.runner import run_overhead

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
    from shortline.benchmark.runner import fit_step

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
    from shortline.benchmark.runner import join_delay

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
