"""What the simulator copies from the live stack: a run's delay before it joins a batch,
and the cap a request's max_tokens puts on its prediction."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.policies import PreemptionRule, make_policy
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.service_model import ServiceModel
from services.scheduler.sim.workload import Workload

A = 0.010
B = 0.001


def _work(arrivals: list[float], lengths: list[int], predicted: list[float]) -> Workload:
    n = len(lengths)
    return Workload(
        arrivals=np.asarray(arrivals, dtype=np.float64),
        prompt_tokens=np.zeros(n, dtype=np.int64),
        true_tokens=np.asarray(lengths, dtype=np.int64),
        predicted=np.asarray(predicted, dtype=np.float64),
        prediction_source="predictor",
    )


def test_a_joining_run_holds_its_slot_but_not_the_batch() -> None:
    """Continuous batching, 2 slots, join delay 0.1 s: job 0 (100 tokens) joins at 0.1
    and runs alone; job 1 (10 tokens) arrives at 0.5, joins at 0.6; job 2 arrives at
    0.55 and must wait for a slot although the batch has only one job until 0.6."""
    model = ServiceModel(step_a_s=A, step_b_s=B, join_delay_s=0.1)
    r = simulate(
        _work([0.0, 0.5, 0.55], [100, 10, 5], [100, 10, 5]),
        make_policy("fcfs"),
        Batching(BatchingMode.CONTINUOUS, max_batch=2),
        workers=1,
        slots=2,
        model=model,
    )
    one, two = A + B, A + 2 * B
    assert r.first_dispatch[0] == 0.0 and r.first_dispatch[1] == 0.5
    assert r.first_token[0] == pytest.approx(0.1 + one)
    # Job 1 joins at 0.6; until then job 0 ran alone (0.5 s at one job per step).
    assert r.first_token[1] == pytest.approx(0.6 + two)
    end1 = 0.6 + 10 * two
    assert r.finish[1] == pytest.approx(end1)
    # Job 2 takes job 1's slot when job 1 ends, and again waits 0.1 s before it decodes,
    # during which job 0 runs alone again.
    assert r.first_dispatch[2] == pytest.approx(end1)
    assert r.first_token[2] == pytest.approx(end1 + 0.1 + two)
    end2 = end1 + 0.1 + 5 * two
    assert r.finish[2] == pytest.approx(end2)
    done0 = 0.5 / one + 10 + 0.1 / one + 5  # job 0's steps by end2
    assert r.finish[0] == pytest.approx(end2 + (100 - done0) * one)


def test_a_run_preempted_before_it_joins_keeps_no_progress_and_loses_no_tokens() -> None:
    """One slot: a long job is dispatched, then a much shorter one arrives inside the
    long job's join delay and preempts it; the long job still emits all its tokens."""
    model = ServiceModel(step_a_s=A, step_b_s=B, join_delay_s=0.05)
    rule = PreemptionRule(factor=2.0, max_fraction=0.5, max_per_job=1)
    r = simulate(
        _work([0.0, 0.01], [200, 5], [200, 5]),
        make_policy("ssjf+preempt", preemption=rule),
        Batching(BatchingMode.NONE),
        workers=1,
        slots=1,
        model=model,
    )
    assert r.preemptions == 1
    assert r.first_dispatch[1] == pytest.approx(0.01)
    assert r.finish[1] == pytest.approx(0.01 + 0.05 + 5 * (A + B))
    # The long job restarts after the short one, from zero tokens, with a new join delay.
    assert r.finish[0] == pytest.approx(r.finish[1] + 0.05 + 200 * (A + B))


def test_max_tokens_caps_the_prediction_the_policy_orders_by() -> None:
    """Behind a running job, two queued jobs: by prediction job 2 (300) goes before job 1
    (400); capped at their max_tokens (20 and 30) job 1 goes first."""
    lengths = [50, 20, 30]
    predicted = [50.0, 400.0, 300.0]
    work = _work([0.0, 0.01, 0.02], lengths, predicted)
    batching = Batching(BatchingMode.NONE)
    model = ServiceModel(step_a_s=A, step_b_s=B)
    plain = simulate(work, make_policy("ssjf"), batching, workers=1, slots=1, model=model)
    assert plain.first_dispatch[2] < plain.first_dispatch[1]  # 300 before 400
    work.max_tokens = np.asarray(lengths, dtype=np.int64)
    capped = simulate(work, make_policy("ssjf"), batching, workers=1, slots=1, model=model)
    assert capped.first_dispatch[1] < capped.first_dispatch[2]  # 20 before 30
