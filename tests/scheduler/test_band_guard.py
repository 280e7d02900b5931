"""The band guard (core/band_guard.py) on a virtual clock: a slot reservation for a higher
band, a batch cap while it runs, band preemption for any policy, all of them inert without
priorities; and the simulator driving the same core through a guard's stops."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from services.scheduler.core.band_guard import BandGuard, GuardSettings
from services.scheduler.core.bands import BandSettings
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign, Decision, Stop
from services.scheduler.core.job import Job
from services.scheduler.core.placement import SlotBoard, WorkerSlots
from services.scheduler.core.policies import PreemptionRule, make_policy
from services.scheduler.core.queue import FifoQueue
from services.scheduler.core.scheduler import SchedulerCore
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.service_model import ServiceModel
from services.scheduler.sim.workload import Workload


def _core(
    guard: GuardSettings, slots: int = 4, spec: str = "ssjf", mode: str = "continuous"
) -> tuple[SchedulerCore, VirtualClock]:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy(spec),
        Batching.parse(mode, 8),
        clock,
        bands=BandSettings(max_wait_s=0.0, guard=guard),
    )
    core.add_worker("w", slots)
    return core, clock


def _add(core: SchedulerCore, job_id: str, predicted: float, priority: int = 0) -> None:
    core.submit(Job(job_id, arrival=core.clock.now(), priority=priority, prompt_tokens=10))
    core.on_prediction(job_id, predicted)


def _started(decisions: list[Decision]) -> list[str]:
    return [d.job.id for d in decisions if isinstance(d, Assign)]


def _stopped(decisions: list[Decision]) -> list[str]:
    return [d.job.id for d in decisions if isinstance(d, Stop)]


def test_with_a_higher_band_active_a_lower_job_leaves_the_reserved_slot_free() -> None:
    core, clock = _core(GuardSettings(reserve_slots=1, reserve_window_s=10.0))
    _add(core, "high", 100, priority=1)
    assert _started(core.dispatch()) == ["high"]
    for i in range(4):
        _add(core, f"low{i}", 10 + i)
    # Four slots, one high job running: the low band fills K - r = 3, never the fourth.
    assert _started(core.dispatch()) == ["low0", "low1", "low2"]
    assert core.free_slots == 0
    core.on_finish("high")
    clock.advance_to(1.0)
    # The high band still counts as active (queued 1 s ago, window 10 s): the slot waits.
    assert core.dispatch() == []
    _add(core, "high2", 100, priority=1)
    assert _started(core.dispatch()) == ["high2"]  # at once, without preempting anyone


def test_the_reservation_lapses_when_the_higher_band_is_idle() -> None:
    core, clock = _core(GuardSettings(reserve_slots=2, reserve_window_s=5.0))
    _add(core, "high", 100, priority=1)
    core.dispatch()
    core.on_finish("high")
    for i in range(4):
        _add(core, f"low{i}", 10 + i)
    assert _started(core.dispatch()) == ["low0", "low1"]
    clock.advance_to(5.5)  # nothing of the high band queued for longer than the window
    assert _started(core.dispatch()) == ["low2", "low3"]


def test_the_cap_bounds_the_batch_while_a_higher_band_runs_and_shrink_stops_the_rest() -> None:
    core, _ = _core(GuardSettings(cap_slots=2))
    for i in range(3):
        _add(core, f"low{i}", 10 * (i + 1))
    assert _started(core.dispatch()) == ["low0", "low1", "low2"]
    _add(core, "high", 100, priority=1)
    assert _started(core.dispatch()) == ["high"]
    core.on_finish("low0")
    _add(core, "low3", 5)
    # Three jobs run (high, low1, low2), above the cap of 2: low3 waits for a free slot
    # below the cap although the worker has two.
    assert core.dispatch() == []
    core.on_finish("high")
    assert _started(core.dispatch()) == ["low3"]  # no higher band running: no cap

    core, _ = _core(GuardSettings(cap_slots=2, cap_shrink=True))
    for i in range(3):
        _add(core, f"low{i}", 10 * (i + 1))
    core.dispatch()
    _add(core, "high", 100, priority=1)
    decisions = core.dispatch()
    # The high job starts, then the low job with the most remaining work is stopped.
    assert _started(decisions) == ["high"] and _stopped(decisions) == ["low2"]
    core.on_stopped("low2", 0)
    assert _stopped(core.dispatch()) == ["low1"]  # one stop in flight at a time
    core.on_stopped("low1", 0)
    assert core.dispatch() == []  # high + low0 = the cap: low1, low2 stay queued
    assert core.running == 2 and len(core.queue) == 2


@pytest.mark.parametrize("mode", ["none", "continuous"])
def test_band_preemption_stops_the_lower_job_with_the_most_remaining_work(mode: str) -> None:
    # Plain ssjf (no preemption of its own): the guard stops a low job for a high one.
    core, _ = _core(GuardSettings(preempt=True), slots=2, mode=mode)
    _add(core, "short", 50)
    _add(core, "long", 500)
    _add(core, "long2", 400)
    core.dispatch()
    running = [j for j in core if j.worker is not None]
    assert len(running) == (1 if mode == "none" else 2)
    _add(core, "high", 10, priority=1)
    (stop,) = core.dispatch()
    assert isinstance(stop, Stop) and stop.job is max(running, key=lambda j: j.predicted)
    core.on_stopped(stop.job.id, 0)
    assert _started(core.dispatch()) == ["high"]
    # The same job is stopped at most max_per_job (1) times; a same-band job never is.
    _add(core, "low-queued", 1)
    assert core.dispatch() == []


def test_band_preemption_leaves_a_job_whose_recompute_costs_more_than_its_rest() -> None:
    policy = replace(make_policy("ssjf"), preemption=PreemptionRule(recompute_cost=1.0))
    jobs: dict[str, Job] = {}
    guard = BandGuard(GuardSettings(preempt=True), policy, None, jobs)
    board = SlotBoard()
    w = WorkerSlots("w", 1)
    board.add(w)
    low = Job("low", arrival=0.0, prompt_tokens=300)
    low.predicted, low.seq = 200.0, 1
    low.to(low.state.PREDICTED)
    low.to(low.state.RUNNING)
    jobs["low"] = low
    w.jobs["low"] = None
    board.take(w)
    guard.queued(low, 0.0)
    guard.started(low, w)
    high = Job("high", arrival=0.0, priority=1)
    high.predicted = 10.0
    queue = FifoQueue()
    high.to(high.state.PREDICTED)
    queue.push(high)
    guard.queued(high, 0.0)
    # 200 tokens to go, 300 to recompute: stopping it would cost more than it frees.
    assert guard.victim(queue, {"w": w}) is None
    low.prompt_tokens = 100
    assert guard.victim(queue, {"w": w}) is low


def _random_trace(core: SchedulerCore, clock: VirtualClock, seed: int) -> list[tuple[str, str]]:
    """Random arrivals and completions, all of band 0; the decisions, in order."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    running: list[str] = []
    for step in range(400):
        clock.advance_to(clock.now() + rng.random())
        if rng.random() < 0.6:
            _add(core, f"j{step}", rng.randint(1, 500))
        elif running:
            core.on_finish(running.pop(rng.randrange(len(running))))
        for d in core.dispatch():
            out.append((type(d).__name__, str(d.job.id)))
            if isinstance(d, Assign):
                running.append(str(d.job.id))
    return out


@pytest.mark.parametrize("spec", ["ssjf", "fcfs", "ssjf+preempt"])
def test_without_priorities_every_guard_changes_nothing(spec: str) -> None:
    every = GuardSettings(
        preempt=True, reserve_slots=3, reserve_window_s=1e9, cap_slots=1, cap_shrink=True
    )
    plain = _random_trace(*_core(GuardSettings(), spec=spec), seed=7)
    guarded = _random_trace(*_core(every, spec=spec), seed=7)
    assert guarded == plain and len(plain) > 100


def test_the_simulator_runs_the_guard_and_it_shields_the_high_band() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    true = rng.integers(20, 600, n)
    work = Workload(
        arrivals=np.cumsum(rng.exponential(2.4, n)),  # rho ~0.9 on 4 slots
        prompt_tokens=np.full(n, 10, dtype=np.int64),
        true_tokens=true.astype(np.int64),
        predicted=true.astype(np.float64),
        prediction_source="oracle",
        priority=(rng.random(n) < 0.2).astype(np.int64),
    )
    high = work.priority == 1
    model = ServiceModel(step_a_s=0.020, step_b_s=0.002)

    def high_p99(guard: GuardSettings) -> tuple[float, int]:
        r = simulate(
            work,
            make_policy("ssjf"),
            Batching(BatchingMode.CONTINUOUS, 4),
            workers=1,
            slots=4,
            model=model,
            bands=BandSettings(max_wait_s=0.0, guard=guard),
        )
        jct = (r.finish - r.arrival)[high]
        assert np.isfinite(r.finish).all()  # every job, stopped or not, finishes
        return float(np.percentile(jct, 99)), r.preemptions

    plain, none = high_p99(GuardSettings())
    shielded, stops = high_p99(GuardSettings(preempt=True, cap_slots=2, cap_shrink=True))
    assert none == 0 and stops > 0
    assert shielded < 0.9 * plain
