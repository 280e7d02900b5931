"""Priority bands, their wait bound, band-aware preemption, fair share between tenants
and per-request deadlines in the latest-start guard: the pure core on a virtual clock."""

from __future__ import annotations

import random

import pytest

from services.scheduler.core.bands import BandedQueue, BandSettings, ServiceLedger
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign, Stop
from services.scheduler.core.job import Job
from services.scheduler.core.policies import make_policy
from services.scheduler.core.scheduler import SchedulerCore


def _core(
    spec: str = "ssjf", bands: BandSettings | None = None, slots: int = 1
) -> tuple[SchedulerCore, VirtualClock]:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy(spec, jct_target_s=1000.0, allow_oracle=True),
        Batching(BatchingMode.NONE),
        clock,
        bands=bands,
    )
    core.add_worker("w", slots)
    return core, clock


def _add(
    core: SchedulerCore,
    job_id: str,
    predicted: float,
    priority: int = 0,
    tenant: str = "",
    deadline: float | None = None,
) -> None:
    now = core.clock.now()
    core.submit(
        Job(
            job_id,
            arrival=now,
            priority=priority,
            tenant=tenant,
            deadline=deadline,
            true_tokens=int(predicted),
        )
    )
    core.on_prediction(job_id, predicted)


def _run_all(core: SchedulerCore, clock: VirtualClock) -> list[str]:
    """Serves the queue one job at a time (one slot), 1 s each; the start order."""
    order = []
    while True:
        decisions = core.dispatch()
        if not decisions:
            return order
        (d,) = decisions
        assert isinstance(d, Assign)
        order.append(d.job.id)
        clock.advance_to(clock.now() + 1.0)
        core.on_finish(d.job.id)


@pytest.mark.parametrize("spec", ["fcfs", "ssjf", "ssjf-aging", "sjf-oracle"])
def test_a_higher_band_goes_first_and_the_policy_orders_within_a_band(spec: str) -> None:
    core, clock = _core(spec)
    _add(core, "busy", 5)
    assert core.dispatch()  # the one slot is taken; the rest queue
    _add(core, "low-long", 300)
    _add(core, "low-short", 10)
    _add(core, "high-long", 200, priority=5)
    _add(core, "high-short", 20, priority=5)
    _add(core, "mid", 50, priority=1)
    clock.advance_to(1.0)
    core.on_finish("busy")
    order = _run_all(core, clock)
    if spec == "fcfs":
        assert order == ["high-long", "high-short", "mid", "low-long", "low-short"]
    else:
        assert order == ["high-short", "high-long", "mid", "low-short", "low-long"]


def test_without_priorities_the_core_keeps_the_policy_queue() -> None:
    core, _ = _core("ssjf-aging")
    _add(core, "a", 10)
    assert not isinstance(core.queue, BandedQueue)
    _add(core, "b", 10, priority=1)
    assert isinstance(core.queue, BandedQueue) and len(core.queue) == 2


def test_a_lower_band_waits_at_most_its_bound() -> None:
    """A steady stream of high-band jobs would starve band 0 for ever; the bound lets the
    low job go after waiting max_wait_s."""
    core, clock = _core("ssjf", BandSettings(max_wait_s=10.0))
    _add(core, "busy", 1, priority=9)
    core.dispatch()
    _add(core, "low", 1)
    started_low = None
    for i in range(40):
        _add(core, f"high-{i}", 1, priority=9)
        clock.advance_to(clock.now() + 1.0)
        running = next(j for j in core if j.worker is not None)
        core.on_finish(running.id)
        (d,) = core.dispatch()
        if d.job.id == "low":
            started_low = clock.now()
            break
    assert started_low is not None and 10.0 < started_low <= 12.0
    strict, clock2 = _core("ssjf", BandSettings(max_wait_s=0.0))  # 0: no bound
    _add(strict, "busy", 1, priority=9)
    strict.dispatch()
    _add(strict, "low", 1)
    for i in range(40):
        _add(strict, f"high-{i}", 1, priority=9)
        clock2.advance_to(clock2.now() + 1.0)
        running = next(j for j in strict if j.worker is not None)
        strict.on_finish(running.id)
        (d,) = strict.dispatch()
        assert d.job.id != "low"


def test_a_higher_band_preempts_a_lower_one_and_never_the_reverse() -> None:
    core, clock = _core("ssjf+preempt")
    _add(core, "low", 100)
    core.dispatch()
    # Same band, similar size: the rule's factor (2) says no.
    _add(core, "low-2", 80)
    assert core.dispatch() == []
    # A higher band preempts whatever its size (the job is early: 0 of 100 tokens).
    _add(core, "high", 500, priority=2)
    (stop,) = core.dispatch()
    assert isinstance(stop, Stop) and stop.job.id == "low"
    core.on_stopped("low", 0)
    (start,) = core.dispatch()
    assert isinstance(start, Assign) and start.job.id == "high"
    # A lower band's much shorter job never preempts the higher band's.
    _add(core, "tiny-low", 1)
    assert core.dispatch() == []
    clock.advance_to(1.0)


def test_fair_share_alternates_a_flooding_tenant_with_a_light_one() -> None:
    core, clock = _core("fcfs", BandSettings(fair_share=True))
    _add(core, "busy", 1, tenant="flood")
    core.dispatch()
    for i in range(10):
        _add(core, f"f{i}", 10, tenant="flood")
    for i in range(3):
        _add(core, f"l{i}", 10, tenant="light")
    clock.advance_to(1.0)
    core.on_finish("busy")
    order = _run_all(core, clock)
    # "flood" already had 1 token of service: "light" goes first, then they take turns.
    assert order[:6] == ["l0", "f0", "l1", "f1", "l2", "f2"]
    unfair, clock2 = _core("fcfs")
    _add(unfair, "busy", 1, tenant="flood")
    unfair.dispatch()
    for i in range(10):
        _add(unfair, f"f{i}", 10, tenant="flood")
    _add(unfair, "l0", 10, tenant="light")
    clock2.advance_to(1.0)
    unfair.on_finish("busy")
    assert _run_all(unfair, clock2).index("l0") == 10


def test_the_ledger_decays_and_survives_a_rescale() -> None:
    ledger = ServiceLedger(half_life_s=10.0)
    ledger.charge("a", 100.0, 0.0)
    ledger.charge("b", 60.0, 10.0)  # a's 100 is worth 50 by now: b (60) has more
    assert ledger.value("b") > ledger.value("a")
    ledger.charge("c", 1.0, 10.0 * 800)  # far later: values are rescaled, order kept
    assert ledger.epoch == 1 and ledger.value("b") > ledger.value("a") >= 0.0


def test_own_deadline_drives_the_latest_start_guard() -> None:
    """ssjf-aging with a long global target: a long job whose own deadline is near goes
    before shorter ones; without its deadline it would go last."""
    for deadline, expect_first in ((22.0, True), (None, False)):
        core, clock = _core("ssjf-aging")
        core.queue.token_time.observe(0.1, 1.0)  # type: ignore[union-attr]  # 0.1 s/token
        _add(core, "busy", 1)
        core.dispatch()
        for i in range(5):
            _add(core, f"short-{i}", 10)
        _add(core, "urgent", 200, deadline=deadline)  # 20 s of service: must start by 2 s
        clock.advance_to(1.0)
        core.on_finish("busy")
        order = _run_all(core, clock)
        assert (order[0] == "urgent") is expect_first, order


def test_random_operations_keep_bands_strict_and_counts_right() -> None:
    rng = random.Random(7)
    core, clock = _core("ssjf", BandSettings(max_wait_s=0.0, fair_share=True), slots=2)
    n = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.5:
            _add(core, f"j{n}", rng.randint(1, 100), rng.randint(0, 3), rng.choice("abc"))
            n += 1
        elif op < 0.6:
            queued = [j for j in core.queue]
            if queued:
                core.on_cancel(rng.choice(queued).id)
        else:
            running = [j for j in core if j.worker is not None]
            if running:
                core.on_finish(rng.choice(running).id)
        clock.advance_to(clock.now() + 0.01)
        for d in core.dispatch():
            assert isinstance(d, Assign)
            waiting = [j.priority for j in core.queue]
            assert not waiting or max(waiting) <= d.job.priority
        assert len(core.queue) == sum(1 for _ in core.queue)
