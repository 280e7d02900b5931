"""How a dynamic batch's steps are charged: padded (all B until the longest ends) or
running-only (what the live replay engine does), and capacity under each."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.policies import make_policy
from services.scheduler.sim.engine import RunResult, simulate
from services.scheduler.sim.service_model import (
    PADDED,
    RUNNING,
    DynamicCharge,
    ServiceModel,
    capacity,
    parse_dynamic_charge,
)
from services.scheduler.sim.workload import Workload

A = 0.010
B = 0.001
WAIT = 0.05


def _model(charge: DynamicCharge) -> ServiceModel:
    return ServiceModel(step_a_s=A, step_b_s=B, dynamic_charge=charge)


def _run(charge: DynamicCharge, arrivals: list[float], lengths: list[int]) -> RunResult:
    n = len(lengths)
    work = Workload(
        arrivals=np.asarray(arrivals, dtype=np.float64),
        prompt_tokens=np.zeros(n, dtype=np.int64),
        true_tokens=np.asarray(lengths, dtype=np.int64),
        predicted=np.asarray(lengths, dtype=np.float64),
        prediction_source="oracle",
    )
    return simulate(
        work,
        make_policy("fcfs"),
        Batching(BatchingMode.DYNAMIC, max_batch=2, wait_s=WAIT),
        workers=1,
        slots=2,
        model=_model(charge),
    )


@pytest.mark.parametrize("charge", [PADDED, RUNNING])
def test_a_short_and_a_long_job_in_one_dynamic_batch(charge: DynamicCharge) -> None:
    """Jobs of 10 and 100 tokens form a batch at t = 0.01 (the second arrival fills it);
    a 5-token job arriving meanwhile waits for the whole batch, then for the batch wait
    (it is alone in the queue), then runs alone."""
    r = _run(charge, [0.0, 0.01, 0.05], [10, 100, 5])
    start = 0.01
    short_end = start + 10 * (A + 2 * B)  # both modes: two sequences for 10 steps
    # Padded: the finished one is still paid for; running: only the long one from step 11.
    padded_end = start + 100 * (A + 2 * B)
    running_end = short_end + 90 * (A + B)
    long_end = padded_end if charge == PADDED else running_end
    assert r.finish[0] == pytest.approx(short_end, abs=1e-9)
    assert r.finish[1] == pytest.approx(long_end, abs=1e-9)
    assert r.first_token[1] == pytest.approx(start + A + 2 * B, abs=1e-9)
    # Either way the batch holds the worker until its last job ends.
    assert r.first_dispatch[2] == pytest.approx(long_end + WAIT, abs=1e-9)
    assert r.finish[2] == pytest.approx(long_end + WAIT + 5 * (A + B), abs=1e-9)


def test_running_only_is_faster_by_exactly_the_padding() -> None:
    padded = _run(PADDED, [0.0, 0.01], [10, 100])
    running = _run(RUNNING, [0.0, 0.01], [10, 100])
    assert padded.finish[1] - running.finish[1] == pytest.approx(90 * B, abs=1e-9)


def test_dynamic_capacity_under_each_charge() -> None:
    """Lengths 10 and 100, batches of 2: E[max] = 77.5, E[sum] = 110 (exact expectation;
    capacity resamples, hence the tolerance)."""
    lengths = np.array([10, 100], dtype=np.int64)
    prompts = np.zeros(2, dtype=np.int64)
    batching = Batching(BatchingMode.DYNAMIC, max_batch=2, wait_s=WAIT)
    padded = capacity(_model(PADDED), batching, 1, 2, lengths, prompts)
    running = capacity(_model(RUNNING), batching, 1, 2, lengths, prompts)
    assert padded == pytest.approx(2 / (77.5 * (A + 2 * B)), rel=0.01)
    assert running == pytest.approx(2 / (77.5 * A + 110 * B), rel=0.01)
    # The charge matters only for dynamic batching.
    for mode, k in ((BatchingMode.NONE, 1), (BatchingMode.CONTINUOUS, 2)):
        b = Batching(mode, max_batch=2)
        assert capacity(_model(PADDED), b, 1, 2, lengths, prompts) == capacity(
            _model(RUNNING), b, 1, 2, lengths, prompts
        )
        assert capacity(_model(PADDED), b, 1, 2, lengths, prompts) == pytest.approx(
            k / (55 * (A + B * k))
        )


@pytest.mark.parametrize("charge", [PADDED, RUNNING])
def test_a_saturated_simulation_runs_at_capacity(charge: DynamicCharge) -> None:
    """Everything queued at once keeps every batch full: the simulated throughput is the
    capacity formula's, for the same charge."""
    rng = np.random.default_rng(4)
    pool = rng.integers(5, 200, size=300)
    n = 20_000
    lengths = pool[rng.integers(0, pool.size, size=n)]
    work = Workload(
        arrivals=np.linspace(0.0, 1e-6, n),
        prompt_tokens=np.zeros(n, dtype=np.int64),
        true_tokens=lengths.astype(np.int64),
        predicted=lengths.astype(np.float64),
        prediction_source="oracle",
    )
    batching = Batching(BatchingMode.DYNAMIC, max_batch=8, wait_s=WAIT)
    r = simulate(work, make_policy("fcfs"), batching, workers=1, slots=8, model=_model(charge))
    cap = capacity(_model(charge), batching, 1, 8, pool, np.zeros(pool.size, dtype=np.int64))
    assert n / float(np.nanmax(r.finish)) == pytest.approx(cap, rel=0.02)


def test_unknown_charge_is_refused() -> None:
    with pytest.raises(ValueError, match="dynamic_charge must be one of padded, running"):
        ServiceModel(dynamic_charge="fluid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 'fluid'"):
        parse_dynamic_charge("fluid")
    assert parse_dynamic_charge("running") == RUNNING
