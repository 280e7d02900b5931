"""The accuracy window replayed in the simulator (services/scheduler/sim/replay.py):
the scheduler's policy by perfect predictions keeps the oracle's whole gain over fcfs,
constant ones none, reversed ones less than none; a group's figure holds only its own
errors; the windows handed to a replay and the figures handed back
(core/accuracy.py); the gauge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.scheduler import metrics
from services.scheduler.core.accuracy import OnlineAccuracy
from services.scheduler.core.batching import Batching
from services.scheduler.core.policies import make_policy
from services.scheduler.sim.replay import Deployment, replay_gain, replay_gains

TOKEN_S = 0.002


def window(n: int = 300, load: float = 0.9, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times, true lengths) of a Poisson window at ``load`` of 4 slots."""
    rng = np.random.default_rng(seed)
    actual = np.maximum(1.0, np.rint(rng.lognormal(4.5, 1.0, n)))
    rate = load * 4 / (float(actual.mean()) * TOKEN_S)
    return 1000.0 + np.cumsum(rng.exponential(1 / rate, n)), actual


def deployment(policy: str = "ssjf", batching: str = "continuous") -> Deployment:
    return Deployment(make_policy(policy), Batching.parse(batching, 4), 1, 4, TOKEN_S)


@pytest.mark.parametrize("policy", ["ssjf", "ssjf-aging"])
@pytest.mark.parametrize("batching", ["continuous", "none"])
def test_true_constant_and_reversed_predictions(policy: str, batching: str) -> None:
    arrival, actual = window()
    d = deployment(policy, batching)
    assert replay_gain(arrival, actual, actual, d) == pytest.approx(1.0, abs=0.02)
    assert replay_gain(arrival, np.full_like(actual, 100.0), actual, d) == pytest.approx(
        0.0, abs=0.02
    )
    assert replay_gain(arrival, 1e6 / actual, actual, d) < -0.1
    noisy = actual * np.random.default_rng(0).lognormal(0.0, 0.8, actual.shape[0])
    assert 0.1 < replay_gain(arrival, noisy, actual, d) < 1.0


def test_the_replay_reads_arrivals_in_any_order_and_counts_its_cost() -> None:
    arrival, actual = window()
    shuffle = np.random.default_rng(1).permutation(actual.shape[0])
    noisy = actual * np.random.default_rng(0).lognormal(0.0, 0.8, actual.shape[0])
    codes = np.zeros(actual.shape[0], np.int64)
    d = deployment()
    r = replay_gains(arrival, noisy, actual, codes, 1, d)
    again = replay_gains(arrival[shuffle], noisy[shuffle], actual[shuffle], codes, 1, d)
    assert r.gains == again.gains and r.simulations == 3
    assert r.fcfs_mean_jct_s > r.oracle_mean_jct_s > 0 and r.seconds > 0


def test_a_groups_figure_holds_only_its_own_errors() -> None:
    arrival, actual = window()
    n = actual.shape[0]
    codes = np.arange(n, dtype=np.int64) % 2  # group 1 reversed, group 0 exact
    predicted = np.where(codes == 1, 1e6 / actual, actual)
    r = replay_gains(arrival, predicted, actual, codes, 3, deployment())
    assert r.gains[0] == pytest.approx(1.0)  # its requests by the truth: the oracle's run
    assert r.gains[1] < 0.9
    assert math.isnan(r.gains[2])  # no request in it
    assert r.simulations == 4  # fcfs, oracle, one per group present
    # The window as a whole loses more than either group alone.
    assert replay_gain(arrival, predicted, actual, deployment()) <= r.gains[1]


def test_a_window_where_no_request_waits_has_nothing_to_gain() -> None:
    actual = np.array([5.0, 50.0, 20.0, 8.0])
    arrival = np.array([0.0, 10.0, 20.0, 30.0])  # each done long before the next
    assert math.isnan(replay_gain(arrival, actual[::-1].copy(), actual, deployment()))
    assert math.isnan(replay_gain(arrival[:1], actual[:1], actual[:1], deployment()))


def test_a_deployment_needs_a_worker_and_a_token_time() -> None:
    with pytest.raises(ValueError):
        Deployment(make_policy("ssjf"), Batching.parse("continuous"), 0, 4, TOKEN_S)
    with pytest.raises(ValueError):
        Deployment(make_policy("ssjf"), Batching.parse("continuous"), 1, 4, 0.0)


def test_windows_go_out_with_what_a_replay_needs_and_figures_come_back() -> None:
    acc = OnlineAccuracy(max_groups=2)
    for i in range(6):
        # 3 s of run for 30 tokens each: 0.1 s per token.
        acc.observe("t", "predictor", "v1", 10 + i, 20 + i, arrival=i, run_seconds=3, run_tokens=30)
    acc.observe("t", "fallback", "", 7, 9, arrival=6.0, run_seconds=1.0, run_tokens=10)
    # No arrival: never replayed, yet a group as compute() has it (cache before fallback
    # by name at one request each: the fallback pooled under head "other").
    acc.observe("t", "cache", "", 7, 9)
    acc.observe("u", "predictor", "v1", 1, 1, arrival=0.0)
    assert acc.unreplayed
    windows = {w.target: w for w in acc.replay_windows()}
    assert not acc.unreplayed and acc.replay_windows() == []
    w = windows["t"]
    assert w.groups == [("cache", "cache"), ("fallback", "other"), ("predictor", "v1")]
    assert w.codes.tolist() == [2, 2, 2, 2, 2, 2, 1]
    assert w.arrival.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert w.predicted[-1] == 7 and w.actual[0] == 20
    assert w.token_time_s == pytest.approx(19.0 / 190.0)
    assert windows["u"].token_time_s == 0.0  # no run time: the caller's token time

    keys = {(g.source, g.head) for g in acc.compute() if g.target == "t"}
    assert keys == set(w.groups)
    assert all(math.isnan(g.replayed_order_gain) for g in acc.compute())
    acc.set_replayed("t", {("predictor", "v1"): 0.75, ("fallback", "other"): 0.25})
    groups = {(g.target, g.source, g.head): g for g in acc.compute()}
    assert groups["t", "predictor", "v1"].replayed_order_gain == 0.75
    assert groups["t", "fallback", "other"].replayed_order_gain == 0.25
    assert math.isnan(groups["t", "cache", "cache"].replayed_order_gain)
    # A recomputed window keeps the last replay's figures until the next replay.
    acc.observe("t", "predictor", "v1", 1, 1, arrival=7.0)
    groups = {(g.target, g.source, g.head): g for g in acc.compute()}
    assert groups["t", "predictor", "v1"].replayed_order_gain == 0.75
    assert acc.unreplayed

    metrics.export_accuracy(acc.compute())
    labels = {"model": "t", "source": "predictor", "head": "v1"}
    name = "shortline_prediction_replayed_order_gain_ratio"
    assert metrics.REGISTRY.get_sample_value(name, labels) == 0.75
    metrics.export_accuracy([])
    assert metrics.REGISTRY.get_sample_value(name, labels) is None
