"""Admission beyond the queue bound, on the pure core (no network, a virtual clock):
the deadline estimate (work ahead in the policy's order, running work, token time),
when it refuses, the retry hint, and per-tenant caps."""

from __future__ import annotations

import math

import pytest

from services.scheduler.core.admission import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    AdmissionControl,
    Estimate,
    TenantCapError,
    TenantCaps,
    deadline_refusal,
    retry_after,
    start_after,
    tenant_cap,
)
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.policies import make_policy
from services.scheduler.core.scheduler import SchedulerCore


def core_with(
    policy: str = "fcfs", *, workers: int = 1, slots: int = 2, queue_limit: int = 100, **kw: float
) -> tuple[SchedulerCore, VirtualClock]:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy(policy, **kw),  # type: ignore[arg-type]
        Batching(BatchingMode.CONTINUOUS, max_batch=slots, wait_s=0.0),
        clock,
        queue_limit=queue_limit,
    )
    for i in range(workers):
        core.add_worker(f"w{i}", slots)
    return core, clock


def submit(
    core: SchedulerCore, job_id: str, predicted: float, deadline: float | None = None
) -> Job:
    job = Job(job_id, arrival=core.clock.now(), model="m", deadline=deadline)
    core.submit(job)
    core.on_prediction(job_id, predicted)
    return job


# ---- the estimate's parts ------------------------------------------------------------


def test_a_job_starts_at_once_on_an_idle_slot_whatever_the_busy_ones_do() -> None:
    assert start_after([5.0], slots=2, ahead_s=[]) == 0.0
    assert start_after([], slots=3, ahead_s=[1.0, 1.0]) == 0.0


def test_a_job_waits_for_the_first_slot_to_free_after_the_jobs_ahead() -> None:
    # Two slots busy 1 s and 4 s; jobs ahead of 2 s and 3 s take the slot freeing
    # first each: 1 -> 3, then 3 -> 6; the next free slot is at 4 s.
    assert start_after([4.0, 1.0], slots=2, ahead_s=[2.0, 3.0]) == 4.0
    assert start_after([1.0], slots=1, ahead_s=[2.0, 3.0]) == 6.0


def test_no_slot_means_no_start() -> None:
    assert math.isinf(start_after([], slots=0, ahead_s=[1.0]))


def test_refused_only_when_the_estimate_exceeds_the_time_left_by_the_margin() -> None:
    est = Estimate(start_s=8.0, service_s=4.0)  # 12 s in all
    assert deadline_refusal(10.0, est, margin=0.2) is None  # 12 <= 10 x 1.2
    why = deadline_refusal(9.0, est, margin=0.2)
    assert why is not None
    assert "12.00 s needed" in why and "8.00 s of queued and running work" in why
    assert "4.00 s to generate" in why and "9.00 s left" in why
    # A negative margin refuses what would only just fit.
    assert deadline_refusal(12.5, est, margin=-0.1) is not None
    assert deadline_refusal(12.5, est, margin=0.0) is None


def test_the_retry_hint_is_when_the_first_running_job_ends_within_bounds() -> None:
    assert retry_after([3.0, 0.7, 9.0]) == 0.7
    assert retry_after([]) == DEFAULT_RETRY_AFTER_S
    assert retry_after([0.0001]) == MIN_RETRY_AFTER_S
    assert retry_after([1e6]) == MAX_RETRY_AFTER_S


# ---- deadlines on a real core ---------------------------------------------------------


def test_without_a_token_time_nothing_is_refused() -> None:
    core, _ = core_with()
    admission = AdmissionControl(core)
    job = submit(core, "a", 1000, deadline=0.001)
    assert admission.seconds_per_token() == 0.0
    assert admission.deadline_problem(job, 0.0) is None


def test_the_running_estimate_learns_seconds_per_token_from_finished_runs() -> None:
    core, clock = core_with()
    admission = AdmissionControl(core)
    job = submit(core, "a", 100)
    core.dispatch()
    clock.advance_to(2.0)
    core.on_finish("a", "length", 100)
    admission.observe_finished(job)
    assert admission.seconds_per_token() == pytest.approx(0.02)
    # Not a finished job (cancelled): learns nothing.
    other = submit(core, "b", 100)
    core.on_cancel("b")
    admission.observe_finished(other)
    assert admission.seconds_per_token() == pytest.approx(0.02)


def test_ssjf_agings_own_token_time_is_preferred() -> None:
    core, _ = core_with("ssjf-aging", jct_target_s=100.0, token_time_s=0.5)
    admission = AdmissionControl(core)
    admission.token_time.observe(1.0, 100.0)  # 0.01, which the queue's configured 0.5 beats
    assert admission.seconds_per_token() == 0.5


def test_fcfs_counts_every_job_ahead_and_refuses_a_deadline_it_cannot_meet() -> None:
    core, clock = core_with("fcfs", slots=1)
    admission = AdmissionControl(core, deadline_margin=0.0)
    admission.token_time.observe(1.0, 100.0)  # 10 ms per token
    running = submit(core, "running", 100)
    core.dispatch()  # busy 1 s more
    for i in range(3):
        submit(core, f"q{i}", 100)  # 3 x 1 s ahead
    late = submit(core, "late", 50, deadline=clock.now() + 4.0)  # needs 4 + 0.5 s
    est = admission.estimate(late)
    assert est is not None
    assert est.start_s == pytest.approx(4.0) and est.service_s == pytest.approx(0.5)
    assert admission.deadline_problem(late, clock.now()) is not None
    ok = submit(core, "ok", 50, deadline=clock.now() + 6.0)  # needs 4.5 + 0.5 s
    assert admission.deadline_problem(ok, clock.now()) is None
    # Time passes: the same job with the same deadline now has less left.
    clock.advance_to(1.5)
    assert admission.deadline_problem(ok, clock.now()) is not None
    assert running.state is JobState.RUNNING


def test_ssjf_counts_only_the_shorter_jobs_ahead() -> None:
    core, clock = core_with("ssjf", slots=1)
    admission = AdmissionControl(core, deadline_margin=0.0)
    admission.token_time.observe(1.0, 100.0)
    submit(core, "running", 100)
    core.dispatch()
    for i in range(5):
        submit(core, f"long{i}", 1000)  # 10 s each, all behind a short job
    short = submit(core, "short", 20, deadline=clock.now() + 1.5)  # 1 s + 0.2 s
    est = admission.estimate(short)
    assert est is not None and est.start_s == pytest.approx(1.0)
    assert admission.deadline_problem(short, clock.now()) is None
    # Under fcfs the same job waits for all five.
    fcfs, fclock = core_with("fcfs", slots=1)
    fadmission = AdmissionControl(fcfs, deadline_margin=0.0)
    fadmission.token_time.observe(1.0, 100.0)
    submit(fcfs, "running", 100)
    fcfs.dispatch()
    for i in range(5):
        submit(fcfs, f"long{i}", 1000)
    fshort = submit(fcfs, "short", 20, deadline=fclock.now() + 1.5)
    assert fadmission.deadline_problem(fshort, fclock.now()) is not None


def test_no_worker_means_no_estimate_and_no_refusal() -> None:
    core, _ = core_with(workers=0)
    admission = AdmissionControl(core)
    admission.token_time.observe(1.0, 100.0)
    job = submit(core, "a", 100, deadline=0.001)
    assert admission.estimate(job) is None
    assert admission.deadline_problem(job, 0.0) is None


def test_the_retry_hint_follows_the_running_jobs() -> None:
    core, _ = core_with(slots=2)
    admission = AdmissionControl(core)
    assert admission.retry_after_s() == DEFAULT_RETRY_AFTER_S
    admission.token_time.observe(1.0, 100.0)
    submit(core, "a", 300)
    submit(core, "b", 80)
    core.dispatch()
    assert admission.retry_after_s() == pytest.approx(0.8)


def test_a_bad_margin_is_refused() -> None:
    core, _ = core_with()
    with pytest.raises(ValueError, match="deadline_shed_margin"):
        AdmissionControl(core, deadline_margin=-1.0)


# ---- tenant caps ----------------------------------------------------------------------


def test_the_cap_is_a_share_of_the_queue_limit() -> None:
    assert tenant_cap(1000, 0.5) == 500
    assert tenant_cap(3, 0.1) == 1  # never 0: a tenant may always queue one
    assert tenant_cap(1000, 1.0) is None
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="tenant_queue_share"):
            tenant_cap(100, bad)


def test_a_tenant_at_its_cap_is_refused_while_another_is_admitted() -> None:
    core, _ = core_with(slots=1, queue_limit=10)
    admission = AdmissionControl(core, tenant_share=0.3)  # 3 waiting places each
    running = submit(core, "a/0", 10)
    admission.admitted("a", running)
    core.dispatch()  # a/0 runs: it holds a slot, not a queue place
    for i in range(1, 4):
        admission.check_tenant("a")
        admission.admitted("a", submit(core, f"a/{i}", 10))
    with pytest.raises(TenantCapError) as err:
        admission.check_tenant("a")
    assert err.value.waiting == 3 and err.value.cap == 3
    assert "'a' already has 3 requests waiting" in str(err.value)
    admission.check_tenant("b")  # another tenant still gets in
    admission.admitted("b", submit(core, "b/0", 10))
    # One of a's waiting jobs is cancelled: a place is free again, counted from the core.
    core.on_cancel("a/1")
    admission.check_tenant("a")


def test_the_anonymous_tenant_is_not_capped() -> None:
    core, _ = core_with(queue_limit=4)
    admission = AdmissionControl(core, tenant_share=0.25)
    for i in range(4):
        admission.check_tenant("")
        admission.admitted("", submit(core, str(i), 10))


def test_ids_of_ended_jobs_are_pruned_so_the_set_stays_bounded() -> None:
    caps = TenantCaps(cap=2)
    live: dict[str, JobState] = {}
    for i in range(1000):
        caps.check("t", live.get)
        caps.add("t", str(i))
        # Ended at once, on whatever path: nobody tells the caps.
    assert caps.tracked("t") <= 2
    caps.add("t", "w1")
    caps.add("t", "w2")
    live.update({"w1": JobState.PREDICTED, "w2": JobState.PREEMPTED})
    with pytest.raises(TenantCapError):
        caps.check("t", live.get)
