"""ssjf-aging's JCT-target guard: a job whose latest start (arrival + D - predicted
service) has passed goes before any shortest-first pick; the token time behind the
predicted service is learned from finished runs; the knobs are checked and wired."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.config import SchedulerConfig, build_policy
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.job import Job
from services.scheduler.core.policies import PolicyError, make_policy, predicted_remaining
from services.scheduler.core.queue import SlackQueue, TokenTime
from services.scheduler.core.scheduler import SchedulerCore
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.service_model import ServiceModel
from services.scheduler.sim.workload import Workload, arrival_times
from shortline.benchmark.simulated import PolicyParams
from shortline.common.config import add_arguments, from_args


def _job(i: int, now: float, pred: int) -> Job:
    job = Job(i, arrival=now)
    job.seq = i
    job.predicted = float(pred)
    job.ready_since = now
    return job


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "pop", "remove"]),
            st.floats(0, 5),
            st.integers(1, 1000),
        ),
        max_size=200,
    ),
    target=st.floats(0.5, 40),
    token_time=st.floats(0.0, 0.05),
    max_moves=st.sampled_from([1, 3, 1000]),
)
def test_a_late_job_goes_before_any_shortest_first_pick(
    ops: list[tuple[str, float, int]], target: float, token_time: float, max_moves: int
) -> None:
    clock = VirtualClock()
    q = SlackQueue(
        lambda j: j.predicted,
        target,
        clock,
        predicted_remaining,
        TokenTime(token_time),
        max_moves=max_moves,
    )
    live: dict[int, Job] = {}
    popped_ids: list[int] = []
    removed: set[int] = set()
    pushed = 0

    def late(j: Job) -> bool:
        return j.arrival + target - j.predicted * token_time <= clock.now()

    for n, (op, dt, r) in enumerate(ops):
        clock.advance_to(clock.now() + dt)
        if op == "push":
            job = _job(n, clock.now(), r)
            q.push(job)
            live[n] = job
            pushed += 1
        elif op == "pop":
            popped = q.pop()
            if not live:
                assert popped is None
                continue
            assert popped is not None and popped.id in live
            overdue = [j for j in live.values() if late(j)]
            pool = overdue or list(live.values())
            # Late jobs first; else plain shortest first. Smallest key among the late
            # ones when no burst outgrew the moves per call.
            assert late(popped) == bool(overdue)
            if max_moves >= len(ops) or not overdue:
                assert popped.predicted == min(j.predicted for j in pool)
            del live[popped.id]
            popped_ids.append(popped.id)
        elif live:
            victim = list(live.values())[r % len(live)]
            assert q.remove(victim)
            assert not q.remove(victim)  # only once
            del live[victim.id]
            removed.add(victim.id)
        assert len(q) == len(live)
        assert {j.id for j in q} == set(live)
    while (job := q.pop()) is not None:
        popped_ids.append(job.id)
    # Every pushed job comes out exactly once, unless it was removed.
    assert len(popped_ids) == len(set(popped_ids)) == pushed - len(removed)
    assert not removed & set(popped_ids)
    assert len(q) == 0 and q.peek() is None


def test_margin_makes_a_job_late_when_the_next_pick_would_make_it_miss() -> None:
    clock = VirtualClock()
    q = SlackQueue(
        lambda j: j.predicted, 100.0, clock, predicted_remaining, TokenTime(0.1), margin=1.0
    )
    long = _job(0, 0.0, 500)  # latest start 100 - 50 = 50
    q.push(long)
    clock.advance_to(45.0)
    short = _job(1, 45.0, 60)  # its service (6 s) would push the long job past 50
    q.push(short)
    assert q.pop() is long
    q.push(long := _job(2, 45.0, 500))  # latest start 95; a 6 s service fits before it
    assert q.pop() is short


def test_token_time_is_learned_as_a_ratio_of_averages_unless_fixed() -> None:
    learned = TokenTime()
    assert learned.value == 0.0
    learned.observe(10.0, 100.0)
    assert learned.value == pytest.approx(0.1)
    for _ in range(500):
        learned.observe(30.0, 100.0)
    assert learned.value == pytest.approx(0.3, rel=1e-3)
    fixed = TokenTime(0.05)
    fixed.observe(30.0, 100.0)
    assert fixed.value == 0.05


def test_the_core_learns_seconds_per_predicted_token_from_finished_runs() -> None:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy("ssjf-aging", jct_target_s=60.0),
        Batching(BatchingMode.NONE),
        clock,
    )
    core.add_worker("w", 1)
    assert isinstance(core.queue, SlackQueue)
    for i in range(3):
        core.submit(Job(i, arrival=clock.now()))
        core.on_prediction(i, 200.0)  # predicted 200 tokens, each run takes 40 s
        (d,) = core.dispatch()
        clock.advance_to(clock.now() + 40.0)
        core.on_finish(d.job.id, "stop", 100)
    assert core.queue.token_time.value == pytest.approx(0.2)
    stats = core.stats()
    assert stats.token_time_s == pytest.approx(0.2)
    assert stats.late_jobs == core.queue.turned_late


def test_a_long_job_finishes_by_its_target_behind_a_stream_of_short_ones() -> None:
    """Plain SSJF starves the long job; the guard starts it in time to finish near D."""
    model = ServiceModel(step_a_s=0.020, step_b_s=0.002)
    n = 4_000
    rng = np.random.default_rng(3)
    true = rng.integers(5, 30, size=n)
    true[100] = 2_000
    step = model.step(1)
    work = Workload(
        arrivals=arrival_times("poisson", n, 0.95 / (float(true.mean()) * step), rng),
        prompt_tokens=np.zeros(n, dtype=np.int64),
        true_tokens=true.astype(np.int64),
        predicted=true.astype(np.float64),
        prediction_source="oracle",
    )
    target = 2_000 * step + 20.0  # the long job's service plus 20 s
    runs = {}
    for name, kw in {"ssjf": {}, "aging": {"jct_target_s": target, "token_time_s": step}}.items():
        policy = make_policy("ssjf" if name == "ssjf" else "ssjf-aging", aging_rate=0.0, **kw)
        runs[name] = simulate(
            work, policy, Batching(BatchingMode.NONE), workers=1, slots=1, model=model
        )
    jct = {k: r.finish - r.arrival for k, r in runs.items()}
    assert jct["ssjf"][100] > target + 20.0  # starved without the guard
    # Late by at most the one short job running when its latest start passed.
    assert jct["aging"][100] <= target + 30 * step + 1e-6
    # The run reports what the guard did: the long job turned late, at the fixed token time.
    assert runs["aging"].late_jobs >= 1 and runs["aging"].token_time_s == step
    assert runs["ssjf"].late_jobs == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("jct_target_s", -1.0),
        ("token_time_s", -0.1),
        ("slack_margin", -1.0),
        ("aging_rate", -2.0),
        ("aging_rate", float("nan")),
    ],
)
def test_bad_knobs_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(PolicyError, match=field):
        make_policy("ssjf-aging", **{field: value})  # type: ignore[arg-type]
    cfg = SchedulerConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match=field):
        build_policy(cfg)


def test_max_wait_is_checked_only_when_it_is_the_guard() -> None:
    assert make_policy("ssjf-aging", jct_target_s=10.0, max_wait_s=0.0).jct_target == 10.0
    with pytest.raises(PolicyError, match="max_wait_s"):
        make_policy("ssjf-aging", jct_target_s=0.0, max_wait_s=0.0)


def test_benchmark_flags_reach_the_scheduler_policy() -> None:
    params = PolicyParams.scaled(2.0, 1.0, "none")
    assert params.jct_target_s == pytest.approx(42.0)  # 21 job times
    parser = argparse.ArgumentParser()
    add_arguments(parser, SchedulerConfig, "scheduler")
    cfg = from_args(
        SchedulerConfig,
        parser.parse_args(["--policy", "ssjf-aging", *params.scheduler_flags()]),
        "scheduler",
    )
    assert cfg.jct_target_s == pytest.approx(42.0)
    assert cfg.slack_margin == params.slack_margin
    policy = build_policy(cfg)
    assert policy.jct_target == pytest.approx(42.0) and policy.wait_bound is None
    assert params.with_fcfs_p99(100.0, "continuous").jct_target_s == pytest.approx(115.0)
