"""ssjf-risk and ssjf-gittins: keys from the predicted length distribution, preemption by
the expected remaining length given what a job has generated (recompute counted), and
every policy still runs on a point prediction alone."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign, Decision, Stop
from services.scheduler.core.job import Job
from services.scheduler.core.policies import POLICY_NAMES, PreemptionRule, make_policy
from services.scheduler.core.scheduler import SchedulerCore
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.service_model import ServiceModel
from services.scheduler.sim.workload import Workload
from shortline.common.length_distribution import LengthDistribution, lognormal_quantiles


def make_core(spec: str, slots: int = 1, recompute: float = 0.0) -> SchedulerCore:
    rule = PreemptionRule(factor=2.0, max_per_job=1, recompute_cost=recompute)
    core = SchedulerCore(
        make_policy(spec, preemption=rule, allow_oracle=True),
        Batching(BatchingMode.CONTINUOUS, max_batch=slots),
        VirtualClock(),
        progress=lambda job: job.generated,  # tests set job.generated themselves
    )
    core.add_worker("w", slots)
    return core


def add(
    core: SchedulerCore,
    job_id: str,
    predicted: float,
    sigma: float | None,
    prompt_tokens: int = 0,
) -> Job:
    job = Job(job_id, arrival=0.0, prompt_tokens=prompt_tokens)
    core.submit(job)
    quantiles = None if sigma is None else lognormal_quantiles(predicted, sigma)
    got = core.on_prediction(job_id, predicted, quantiles=quantiles)
    assert got is job
    return job


def started(decisions: list[Decision]) -> list[str]:
    return [d.job.id for d in decisions if isinstance(d, Assign)]


def stopped(decisions: list[Decision]) -> list[str]:
    return [d.job.id for d in decisions if isinstance(d, Stop)]


@pytest.mark.parametrize("spec", ["ssjf", "ssjf-risk"])
def test_a_heavier_tail_with_the_same_median_goes_later_under_ssjf_risk(spec: str) -> None:
    core = make_core(spec)
    add(core, "blocker", 1.0, None)
    assert started(core.dispatch()) == ["blocker"]
    add(core, "heavy", 100.0, 1.2)  # queued first: ssjf's tie goes to it
    add(core, "light", 100.0, 0.2)
    core.on_finish("blocker")
    first = started(core.dispatch())
    assert first == (["light"] if spec == "ssjf-risk" else ["heavy"])


def test_the_distribution_is_dropped_without_the_predictor() -> None:
    core = make_core("ssjf-risk")
    job = Job("j", arrival=0.0)
    core.submit(job)
    core.on_prediction("j", None, quantiles=lognormal_quantiles(100.0, 0.5))  # fallback
    assert job.length_dist is None


def run_long_then_short(spec: str, recompute: float, prompt: int) -> list[str]:
    """A job predicted at 100 that has generated 400 (it outlived its prediction) runs on
    the only slot; a job predicted at 10 arrives."""
    core = make_core(spec, recompute=recompute)
    long = add(core, "long", 100.0, 0.5, prompt_tokens=prompt)
    assert started(core.dispatch()) == ["long"]
    long.generated = 400
    add(core, "short", 10.0, 0.3)
    return stopped(core.dispatch())


def test_an_overrun_job_is_preempted_when_its_remaining_length_says_so() -> None:
    # Given 400 tokens, the 0.5-sigma distribution around 100 leaves ~57 expected; the
    # short one's ~11 x factor 2 is less, and recompute is free: stop it.
    assert run_long_then_short("ssjf-gittins+preempt", 0.0, 500) == ["long"]
    assert run_long_then_short("ssjf-risk+preempt", 0.0, 500) == ["long"]
    # The point-only rule sees 1 token left (and a job past 10% of it): never.
    assert run_long_then_short("ssjf+preempt", 0.0, 500) == []


def test_the_remaining_length_is_conditioned_on_the_tokens_generated() -> None:
    # Predicted 100 (mean ~116); after 90 tokens ~62 are expected to remain, under twice
    # the queued job's ~37: no preemption, though the unconditional mean would say yes.
    core = make_core("ssjf-gittins+preempt")
    long = add(core, "long", 100.0, 0.5)
    core.dispatch()
    long.generated = 90
    add(core, "mid", 37.0, 0.05)
    assert stopped(core.dispatch()) == []


def test_recompute_cost_can_outweigh_the_remaining_length() -> None:
    # Recomputing 500 prompt + 400 generated tokens at 0.05 decode tokens each is 45:
    # 57 - 45 no longer beats the short job's 2 x 11.
    assert run_long_then_short("ssjf-gittins+preempt", 0.05, 500) == []
    # The same cost with a short prompt (0.05 x 410 = 20.5) still pays.
    assert run_long_then_short("ssjf-gittins+preempt", 0.05, 10) == ["long"]


def test_with_a_slot_about_to_free_nobody_is_preempted() -> None:
    # Two slots: the long overrun job and one with ~1 token left. The short queued job
    # gets that slot in a moment; stopping the long one would buy it nothing.
    core = make_core("ssjf-gittins+preempt", slots=2)
    long = add(core, "long", 100.0, 0.5)
    soon = add(core, "soon", 100.0, 0.05)
    assert sorted(started(core.dispatch())) == ["long", "soon"]
    long.generated = 400
    soon.generated = 120  # past its tight distribution: almost nothing left
    add(core, "short", 10.0, 0.3)
    assert stopped(core.dispatch()) == []

    # The same, with the second job early in its run (~90 tokens to go): now the first
    # free slot is ~57 tokens away (the long one's), and the longest, it, is stopped.
    core = make_core("ssjf-gittins+preempt", slots=2)
    long = add(core, "long", 100.0, 0.5)
    early = add(core, "early", 100.0, 0.05)
    core.dispatch()
    long.generated = 400
    early.generated = 10
    add(core, "short", 10.0, 0.3)
    assert stopped(core.dispatch()) == ["early"]


def tiny_workload(n: int, with_quantiles: bool) -> Workload:
    rng = np.random.default_rng(3)
    true = rng.lognormal(4.5, 0.8, n).astype(np.int64) + 1
    pred = true * rng.lognormal(0.0, 0.5, n)
    q = np.asarray([lognormal_quantiles(p, 0.5) for p in pred]) if with_quantiles else None
    return Workload(
        arrivals=np.cumsum(rng.exponential(0.5, n)),
        prompt_tokens=np.full(n, 50, dtype=np.int64),
        true_tokens=true,
        predicted=pred,
        prediction_source="predictor",
        quantiles=q,
    )


@pytest.mark.parametrize("mode", ["none", "dynamic", "continuous"])
@pytest.mark.parametrize("with_quantiles", [False, True])
def test_every_policy_runs_with_and_without_a_distribution(mode: str, with_quantiles: bool) -> None:
    work = tiny_workload(300, with_quantiles)
    specs = list(POLICY_NAMES) + [f"{p}+preempt" for p in POLICY_NAMES if p != "fcfs"]
    for spec in specs:
        policy = make_policy(spec, allow_oracle=True, jct_target_s=60.0)
        result = simulate(
            work,
            policy,
            Batching.parse(mode, 4, 0.05),
            workers=1,
            slots=4,
            model=ServiceModel(0.02, 0.002, 150e-6),
        )
        assert not np.isnan(result.finish).any(), spec
        assert (result.finish >= result.arrival).all(), spec


def test_requeued_job_is_keyed_by_what_is_left() -> None:
    dist = LengthDistribution.lognormal(100.0, 0.5)
    job = Job("j", arrival=0.0)
    job.length_dist = dist
    job.predicted = 100.0
    policy = make_policy("ssjf-gittins")
    assert policy.key is not None
    fresh = policy.key(job)
    job.generated = 400
    assert policy.key(job) == pytest.approx(dist.gittins_key(400))
    assert policy.key(job) != fresh


def test_the_service_reads_quantiles_only_when_the_contract_has_them() -> None:
    from types import SimpleNamespace

    from services.scheduler.service.prediction import distribution_of
    from shortline.predictor.v1 import predictor_pb2

    before = SimpleNamespace(predicted_tokens=100.0)  # generated code without the field
    assert distribution_of(SimpleNamespace(), before, 1.0) is None
    if "quantiles" not in predictor_pb2.Prediction.DESCRIPTOR.fields_by_name:
        pytest.skip("predictor.proto has no Prediction.quantiles yet")
    qs = lognormal_quantiles(100.0, 0.5)
    reply = predictor_pb2.PredictResponse(predictions=[predictor_pb2.Prediction(quantiles=qs)])
    dist = distribution_of(reply, reply.predictions[0], 2.0)  # benchmark-mode scale 2
    assert dist is not None
    assert dist.quantiles[2] == pytest.approx(50.0)
    empty = predictor_pb2.Prediction(predicted_tokens=100.0)  # a head without quantiles
    assert distribution_of(reply, empty, 1.0) is None
    short = predictor_pb2.Prediction(quantiles=qs[:3])  # malformed: the point is used
    assert distribution_of(reply, short, 1.0) is None
