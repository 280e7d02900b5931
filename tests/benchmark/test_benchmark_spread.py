"""The jittered replays of live cells: paired ratios, per-replay targets, a finished run rebuilt."""

from __future__ import annotations

import dataclasses

import numpy as np

from services.scheduler.core.batching import Batching
from services.scheduler.sim.service_model import ServiceModel
from services.scheduler.sim.workload import LengthSet
from shortline.benchmark.report.tables import spread_tables
from shortline.benchmark.report.targets import targets
from shortline.benchmark.simulated import PolicyParams, azure_lengths, sim_cell
from shortline.benchmark.spread import CellSetup, replay_spread, with_true_predictions
from shortline.benchmark.summary import summarize
from shortline.benchmark.workload import LengthPool, build, scale_lengths

MODEL = ServiceModel(0.010, 0.0015)
POLICIES = ["fcfs", "ssjf", "ssjf-aging", "sjf-oracle"]


def _cells() -> list[CellSetup]:
    lengths = LengthSet(
        prompts=["a", "b", "c", "d"],
        prompt_tokens=np.array([3, 4, 5, 6]),
        true_tokens=np.array([50, 200, 400, 900]),
        name="test",
    )
    pool = LengthPool(
        lengths, scale_lengths(lengths.true_tokens, 10), np.array([80.0, 150, 500, 700]), 10
    )
    # One slot at ~0.45 s per job: 1.8 req/s is rho ~0.8, so a queue forms in the bursts.
    work = build(pool, n=200, rate=1.8, trace="conv", seed=2)
    params = dataclasses.replace(PolicyParams.scaled(0.5, 1.0, "none"), jct_target_s=8.0)
    batching = Batching.parse("none", 8, 0.05)
    return [CellSetup("none", batching, params, 0.9, p, work) for p in POLICIES]


def _spread(cells: list[CellSetup] | None = None, **kw: float) -> dict:
    return replay_spread(
        _cells() if cells is None else cells,
        MODEL,
        slots=8,
        workers=1,
        slo_factor=5.0,
        cache_size=0,
        run_overhead_s={},
        join_delay_s={},
        replays=3,
        seed=5,
        **kw,
    )


def test_without_jitter_every_replay_is_the_cell_itself() -> None:
    got = _spread(jitter_s=0.0, step_sd=0.0)
    cells = {c["policy"]: c for c in got["cells"]}
    assert set(cells) == set(POLICIES)
    direct = {}
    for c in _cells():
        times, _ = sim_cell(
            c.work,
            c.policy,
            c.batching,
            workers=1,
            slots=8,
            model=MODEL,
            params=c.params,
            cache_size=0,
        )
        direct[c.policy] = summarize(times, step_one_s=MODEL.step(1), slo_factor=5.0)
    for p in POLICIES:
        want = direct[p]["mean_jct_s"] / direct["fcfs"]["mean_jct_s"]
        assert cells[p]["mean_jct_vs_fcfs"] == [want] * 3
    assert cells["ssjf"]["mean_jct_vs_fcfs"][0] < 1.0  # a queue formed: there is a gain


def test_jitter_moves_the_cells_but_fcfs_stays_the_reference() -> None:
    got = _spread(jitter_s=0.01, step_sd=0.05)
    cells = {c["policy"]: c for c in got["cells"]}
    assert cells["fcfs"]["mean_jct_vs_fcfs"] == [1.0, 1.0, 1.0]  # ratios are paired
    assert len(set(cells["ssjf"]["mean_jct_vs_fcfs"])) > 1
    assert _spread(jitter_s=0.01, step_sd=0.05) == got  # seeded
    targets = {(t["target"], t["batching"]): t for t in got["targets"]}
    share = targets[("ssjf captures >= 80% of the oracle's gain", "none")]
    assert len(share["values"]) == 3 and 0 <= share["met"] <= 3
    assert share["met"] == sum(v >= 0.8 for v in share["values"])


def test_the_tables_put_the_live_run_beside_the_replays() -> None:
    got = _spread()
    means = {"fcfs": 10.0, "ssjf": 7.0, "ssjf-aging": 8.0, "sjf-oracle": 6.0}
    shares = {"fcfs": float("nan"), "ssjf": 0.75, "ssjf-aging": 0.5, "sjf-oracle": 1.0}
    live = [
        {
            "batching": "none",
            "rho": 0.9,
            "policy": p,
            "mean_jct_s": m,
            "p99_jct_s": 20.0,
            "throughput_tps": 100.0,
            "mean_jct_vs_fcfs": m / 10.0,
            "p99_jct_vs_fcfs": 1.0,
            "oracle_share": shares[p],
        }
        for p, m in means.items()
    ]
    md = spread_tables(got, live)
    assert "| none | 0.90 | ssjf | 0.700 |" in md
    assert "met in replays (of 3)" in md
    assert "| fcfs |" not in md


def test_azure_lengths_get_noise_at_the_asked_tau_and_their_own_targets() -> None:
    common = {
        "requests": 600,
        "trace": "poisson",
        "target_model": "Meta-Llama-3-8B-Instruct",
        "slots": 8,
        "model": MODEL,
        "batch_wait_ms": 50.0,
        "seed": 4,
        "workers": 1,
        "rho": 0.9,
    }
    rows = azure_lengths(
        [0.45, 0.6], batching="none", policies="fcfs,ssjf,sjf-oracle", common=common
    )
    assert len(rows) == 6
    for r in rows:
        assert r["lengths"] == "azure2023/conv"
        # The simulator draws the very noise the calibration solved for.
        assert abs(r["predictor_kendall_tau"] - r["kendall_tau"]) < 0.005
    assert rows[0]["noise_sigma"] > rows[3]["noise_sigma"]  # less noise for a higher tau
    where = {t["where"] for t in targets([], rows)}
    assert where == {
        "sim 1 worker(s), poisson, rho 0.9, azure2023/conv lengths, noise at tau 0.45",
        "sim 1 worker(s), poisson, rho 0.9, azure2023/conv lengths, noise at tau 0.60",
    }


def test_a_perfect_predictor_makes_ssjf_order_as_the_oracle() -> None:
    # A head that misorders: every request gets another request's prediction.
    wrong = [
        dataclasses.replace(c, work=dataclasses.replace(c.work, predicted=c.work.predicted[::-1]))
        for c in _cells()
    ]
    cells = with_true_predictions(wrong)
    for c, before in zip(cells, wrong, strict=True):
        assert np.array_equal(c.work.predicted / c.work.length_scale, c.work.true_tokens)
        assert not np.array_equal(before.work.predicted, c.work.predicted)

    def ratios(cells: list[CellSetup]) -> dict[str, list[float]]:
        return {c["policy"]: c["mean_jct_vs_fcfs"] for c in _spread(cells)["cells"]}

    head, perfect = ratios(wrong), ratios(cells)
    assert head["ssjf"] != head["sjf-oracle"]
    assert perfect["ssjf"] == perfect["sjf-oracle"]  # the oracle's order, replay by replay
    assert perfect["sjf-oracle"] == head["sjf-oracle"]  # the oracle never used predictions
