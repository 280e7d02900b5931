"""SchedulerCore behaviour pinned on small, hand-checked scenarios."""

from __future__ import annotations

import pytest

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign, QueueFullError, Stop
from services.scheduler.core.job import IllegalTransitionError, Job, JobState
from services.scheduler.core.policies import PolicyError, PreemptionRule, make_policy
from services.scheduler.core.scheduler import SchedulerCore


def core_with(
    policy: str = "ssjf",
    *,
    workers: int = 1,
    slots: int = 1,
    mode: BatchingMode = BatchingMode.CONTINUOUS,
    queue_limit: int = 100,
    **kw: float,
) -> tuple[SchedulerCore, VirtualClock]:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy(policy, allow_oracle=True, **kw),  # type: ignore[arg-type]
        Batching(mode, max_batch=slots, wait_s=1.0),
        clock,
        queue_limit=queue_limit,
    )
    for i in range(workers):
        core.add_worker(f"w{i}", slots)
    return core, clock


def submit(core: SchedulerCore, job_id: str, predicted: float, true: int | None = None) -> Job:
    job = Job(job_id, arrival=core.clock.now(), model="m", true_tokens=true)
    core.submit(job)
    core.on_prediction(job_id, predicted)
    return job


def test_illegal_transition_raises() -> None:
    job = Job("a", arrival=0.0)
    with pytest.raises(IllegalTransitionError, match="QUEUED -> DONE"):
        job.to(JobState.DONE)


def test_ssjf_runs_shortest_prediction_first_and_fcfs_arrival_order() -> None:
    for policy, expected in (("ssjf", ["c", "b", "a"]), ("fcfs", ["a", "b", "c"])):
        core, _ = core_with(policy)
        busy = submit(core, "busy", 1)
        assert core.dispatch() == [Assign(busy, "w0")]
        for name, pred in (("a", 300), ("b", 200), ("c", 100)):
            submit(core, name, pred)
        order = []
        core.on_finish("busy")
        for _ in range(3):
            (decision,) = core.dispatch()
            order.append(decision.job.id)
            core.on_finish(decision.job.id)
        assert order == expected, policy


def test_queue_limit_raises_typed_error() -> None:
    core, _ = core_with(queue_limit=2)
    submit(core, "a", 1)
    submit(core, "b", 1)
    with pytest.raises(QueueFullError, match="limit 2"):
        core.submit(Job("c", arrival=0.0))


def test_serving_refuses_oracle() -> None:
    with pytest.raises(PolicyError, match="benchmark"):
        make_policy("sjf-oracle")


def test_least_loaded_placement_spreads_jobs() -> None:
    core, _ = core_with(workers=2, slots=4)
    for i in range(4):
        submit(core, f"j{i}", 10)
    workers = [d.worker_id for d in core.dispatch() if isinstance(d, Assign)]
    assert sorted(workers) == ["w0", "w0", "w1", "w1"]


def test_dynamic_batch_waits_then_frees_slots_together() -> None:
    core, clock = core_with(slots=3, mode=BatchingMode.DYNAMIC)
    submit(core, "a", 5)
    assert core.dispatch() == []  # fewer than B jobs: wait up to T
    assert core.next_timer() == pytest.approx(1.0)
    submit(core, "b", 5)
    clock.advance_to(1.0)
    started = core.dispatch()
    assert [d.job.id for d in started] == ["a", "b"]
    submit(core, "c", 5)
    submit(core, "d", 5)
    submit(core, "e", 5)
    core.on_finish("a")
    assert core.dispatch() == []  # b still runs: the batch's slots are still held
    core.on_finish("b")
    assert [d.job.id for d in core.dispatch()] == ["c", "d", "e"]


def test_preemption_requeues_with_remaining_prediction() -> None:
    clock = VirtualClock()
    policy = make_policy("ssjf+preempt", preemption=PreemptionRule(4.0, 0.5, 1))
    core = SchedulerCore(policy, Batching(BatchingMode.NONE), clock)
    core.add_worker("w", 1)
    long = submit(core, "long", 1000)
    core.dispatch()
    core.on_progress("long", 100)
    short = submit(core, "short", 10)
    decisions = core.dispatch()
    assert decisions == [Stop(long, "w", True)]
    assert long.state is JobState.PREEMPTED
    core.on_stopped("long", 120)
    assert long.state is JobState.PREDICTED and long.entry is not None
    assert long.entry[0] == 880  # remaining prediction
    assert core.dispatch() == [Assign(short, "w")]
    core.on_finish("short")
    assert core.dispatch() == [Assign(long, "w")]
    # The limit of one preemption per job holds.
    submit(core, "short2", 1)
    assert core.dispatch() == []


def test_cancel_running_holds_slot_until_worker_stops() -> None:
    core, _ = core_with()
    a = submit(core, "a", 5)
    submit(core, "b", 5)
    core.dispatch()
    stop = core.on_cancel("a")
    assert stop == Stop(a, "w0", False)
    assert core.dispatch() == []
    core.on_stopped("a", 3)
    assert [d.job.id for d in core.dispatch()] == ["b"]
    assert a.state is JobState.CANCELLED


def test_worker_lost_requeues_running_jobs() -> None:
    core, _ = core_with(workers=2, slots=1)
    a = submit(core, "a", 5)
    core.dispatch()
    core.on_progress("a", 2)
    worker = a.worker
    assert core.on_worker_lost(worker) == [a]
    assert a.state is JobState.PREDICTED and a.generated == 2
    (d,) = core.dispatch()
    assert d.job is a and d.worker_id != worker


def test_deadline_cancels_waiting_and_running_jobs() -> None:
    core, clock = core_with()
    run = Job("run", arrival=0.0, deadline=2.0)
    wait = Job("wait", arrival=0.0, deadline=1.0)
    for j in (run, wait):
        core.submit(j)
        core.on_prediction(j.id, 5)
    core.dispatch()
    clock.advance_to(1.5)
    assert core.expire() == [(wait, None)]
    assert wait.state is JobState.CANCELLED and wait.finish_reason == "deadline"
    clock.advance_to(2.0)
    assert core.expire() == [(run, Stop(run, "w0", False))]


def test_cache_hit_overrides_prediction() -> None:
    clock = VirtualClock()
    core = SchedulerCore(make_policy("ssjf"), Batching(), clock, cache=SemanticCache(threshold=0.9))
    core.add_worker("w", 1)
    core.submit(Job("a", arrival=0.0, length_model="L"))
    core.on_prediction("a", 100, embedding=[1.0, 0.0])
    core.dispatch()
    core.on_finish("a", generated=37)
    core.submit(Job("b", arrival=0.0, length_model="L"))
    b = core.on_prediction("b", 100, embedding=[0.99, 0.05])
    assert b is not None and b.predicted == 37 and b.prediction_source == "cache"
    core.submit(Job("c", arrival=0.0, length_model="L"))
    c = core.on_prediction("c", 100, embedding=[0.0, 1.0])
    assert c is not None and c.predicted == 100
    assert core.cache is not None and core.cache.hits == 1 and core.cache.lookups == 3


def test_fallback_uses_running_median_of_observed_lengths() -> None:
    core, _ = core_with(workers=1)
    for i, n in enumerate((10, 30, 20)):
        submit(core, f"j{i}", 5)
        core.dispatch()
        core.on_finish(f"j{i}", generated=n)
    core.submit(Job("x", arrival=0.0, model="m"))
    x = core.on_prediction_failed("x")
    assert x is not None and x.predicted == 20 and x.prediction_source == "fallback"
    assert core.fallback.used == 1


@pytest.mark.parametrize("cap", [True, False])
def test_prediction_is_capped_at_max_tokens_unless_benchmark_mode_turns_it_off(cap: bool) -> None:
    """Serving caps (a job cannot outrun max_tokens); a replay benchmark must not, since
    its max_tokens is the true length and the cap would hand SSJF the oracle."""
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy("ssjf"), Batching(BatchingMode.NONE), clock, cap_at_max_tokens=cap
    )
    core.submit(Job("long-predicted", arrival=0.0, max_tokens=20))
    core.submit(Job("short-predicted", arrival=0.0, max_tokens=30))
    core.on_prediction("long-predicted", 400.0)
    core.on_prediction("short-predicted", 300.0)
    core.add_worker("w", 1)
    (first,) = core.dispatch()
    assert isinstance(first, Assign)
    assert first.job.id == ("long-predicted" if cap else "short-predicted")
    assert first.job.predicted == (20.0 if cap else 300.0)


def test_fallback_keeps_a_bounded_number_of_model_windows() -> None:
    from services.scheduler.core.fallback import FallbackPredictor

    fb = FallbackPredictor(default_tokens=100.0, window=5, max_models=3)
    for model, tokens in (("a", 10), ("b", 20), ("c", 30), ("a", 10)):
        fb.observe(model, tokens)
    for i in range(50):  # client-chosen names: only the 3 most recent stay
        fb.observe(f"junk-{i}", 1)
    assert fb.predict("a") == 100.0  # evicted: back to the default
    assert fb.predict("junk-49") == 1.0
    assert len(fb._models) == 3


def test_a_job_started_by_a_dispatch_is_not_preempted_by_the_same_dispatch() -> None:
    """The latest-start guard sends a late long job first; the same dispatch must not
    then stop it for the short job behind it (the simulator saw 19 of 24 preemptions
    of ssjf-aging+preempt be this: an Assign and a Stop of one job, a prefill wasted)."""
    core, clock = core_with(
        "ssjf-aging+preempt", jct_target_s=1.0, token_time_s=0.01, aging_rate=1.0
    )
    long = submit(core, "long", 1000)  # latest start: 1 - 10 s before its arrival
    clock.advance_to(0.5)
    submit(core, "short", 10)
    decisions = core.dispatch()
    assert decisions == [Assign(long, "w0")]
    assert long.state is JobState.RUNNING and long.preemptions == 0
