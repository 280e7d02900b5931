"""No job finishes faster than its own service, under any policy or batching mode.

Guards the negative mean JCT ``shortline simulate --policies ssjf-aging+preempt`` once
printed: the core's preemption check runs within the dispatch that assigned a run,
before the simulator had started that run, and the simulator's progress callback then
read the worker's whole step count as the new job's tokens. The job "resumed" past
its end and finished at a time before it arrived.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.policies import POLICY_NAMES, PolicySettings
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.report import summarize
from services.scheduler.sim.service_model import ServiceModel, capacity
from services.scheduler.sim.workload import Workload, arrival_times

MODEL = ServiceModel(step_a_s=0.020, step_b_s=0.002, prefill_per_token_s=50e-6)
# The live stack's costs too: a run starts late (join delay) and stalls its worker.
LIVE_LIKE = ServiceModel(
    step_a_s=0.020,
    step_b_s=0.002,
    prefill_per_token_s=50e-6,
    run_overhead_s=0.003,
    join_delay_s=0.010,
    dynamic_charge="running",
)
SLOTS = 4
SPECS = [p for p in POLICY_NAMES] + [f"{p}+preempt" for p in POLICY_NAMES if p != "fcfs"]


def workload(mode: BatchingMode, n: int = 1500, rho: float = 0.95) -> Workload:
    """Heavy-tailed lengths, predictions off by a lognormal factor: aging and preemption
    both have work to do."""
    rng = np.random.default_rng(3)
    true = np.maximum(1, rng.lognormal(5.0, 0.9, size=n)).astype(np.int64)
    prompt = rng.integers(10, 400, size=n).astype(np.int64)
    cap = capacity(MODEL, Batching(mode, SLOTS), 1, SLOTS, true, prompt)
    return Workload(
        arrivals=arrival_times("poisson", n, rho * cap, rng),
        prompt_tokens=prompt,
        true_tokens=true,
        predicted=true * np.exp(0.8 * rng.standard_normal(n)),
        prediction_source="noisy",
    )


@pytest.mark.parametrize("model", [MODEL, LIVE_LIKE], ids=["plain", "live-like"])
@pytest.mark.parametrize("mode", list(BatchingMode))
def test_every_jct_is_at_least_the_jobs_service_time(
    mode: BatchingMode, model: ServiceModel
) -> None:
    work = workload(mode)
    batching = Batching(mode, SLOTS)
    cap = capacity(MODEL, batching, 1, SLOTS, work.true_tokens, work.prompt_tokens)
    settings = PolicySettings.reference(1.0 / cap, mode.value)
    # The least a job can take: its prefill, then one step per token with itself alone in
    # the batch (every step is a + b * n with n >= 1).
    service = model.prefill_per_token_s * work.prompt_tokens + work.true_tokens * model.step(1)
    assert (service > 0).all()
    preempted = 0
    for spec in SPECS:
        r = simulate(
            work,
            settings.policy(spec, allow_oracle=True),
            batching,
            workers=1,
            slots=SLOTS,
            model=model,
        )
        jct = r.finish - r.arrival
        assert not np.isnan(jct).any(), spec
        short = np.flatnonzero(jct < service * (1 - 1e-9))
        assert short.size == 0, (spec, short[:5], jct[short[:5]], service[short[:5]])
        assert (r.first_dispatch >= r.arrival).all(), spec
        assert (r.first_token > r.arrival).all(), spec
        assert summarize(r)["mean_jct_s"] > 0, spec
        preempted += r.preemptions
    if mode is not BatchingMode.DYNAMIC:  # the core preempts only outside dynamic batches
        assert preempted > 0, "no preemption exercised"
