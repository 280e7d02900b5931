"""The benchmark cell's summary row against values worked out by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from shortline.benchmark.summary import (
    ORACLE_POLICY,
    RATIOS,
    RequestTimes,
    goodput,
    paper_throughput,
    summarize,
)
from shortline.common.stats import add_ratios


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
    add_ratios(rows, ("batching",), RATIOS, oracle=ORACLE_POLICY)
    assert rows[1]["mean_jct_vs_fcfs"] == pytest.approx(0.7)
    assert rows[1]["p99_jct_vs_fcfs"] == pytest.approx(1.5)
    assert rows[1]["oracle_share"] == pytest.approx(0.75)
    assert rows[4]["mean_jct_vs_fcfs"] == pytest.approx(0.75)
    assert math.isnan(rows[4]["oracle_share"])  # no oracle in that group
    # Every benchmark ratio is named <key>_vs_fcfs; a value the rows lack is NaN.
    assert math.isnan(rows[1]["throughput_tps_vs_fcfs"])
    assert RATIOS["p99_jct_s"] == "p99_jct_vs_fcfs"
    assert RATIOS["throughput_tps"] == "throughput_tps_vs_fcfs"
