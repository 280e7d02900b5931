"""Property tests of SchedulerCore: whatever the interleaving of events, no job is
lost or finished twice, FCFS keeps arrival order, the aging bound holds, and a
preempted job resumes with exactly its remaining tokens."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign, Stop
from services.scheduler.core.job import Job, JobState
from services.scheduler.core.policies import PreemptionRule, make_policy
from services.scheduler.core.queue import BoundedWaitQueue
from services.scheduler.core.scheduler import SchedulerCore

# "slack:" = ssjf-aging with the JCT-target guard (latest starts) instead of the wait bound.
POLICIES = [
    "fcfs",
    "ssjf",
    "ssjf-aging",
    "slack:ssjf-aging",
    "slack:ssjf-aging+preempt",
    "sjf-oracle",
    "ssjf+preempt",
    "sjf-oracle+preempt",
]
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["arrive", "arrive", "predict", "fail_predict", "finish", "progress", "cancel",
             "stopped", "lose_worker", "add_worker", "tick", "run_failed"]
        ),
        st.integers(0, 10_000),
    ),
    max_size=120,
)  # fmt: skip


class Driver:
    """Plays the worker side honestly: runs what it is told, confirms stops later."""

    def __init__(self, core: SchedulerCore, clock: VirtualClock) -> None:
        self.core = core
        self.clock = clock
        self.submitted: dict[Any, Job] = {}
        self.running: dict[Any, tuple[Any, Job]] = {}  # job id -> (worker, job)
        self.stopping: dict[Any, Job] = {}
        self.done_calls: dict[Any, int] = {}
        self.next_id = 0
        self.next_worker = 0

    def handle(self, decisions: list[Assign | Stop]) -> None:
        for d in decisions:
            if isinstance(d, Assign):
                assert d.job.id not in self.running, "job assigned twice"
                assert d.job.state is JobState.RUNNING
                self.running[d.job.id] = (d.worker_id, d.job)
            else:
                assert d.job.id in self.running
                self.stopping[d.job.id] = d.job

    def step(self, op: str, r: int) -> None:
        core = self.core
        self.clock.advance_to(self.clock.now() + (r % 7) * 0.5)
        if op == "arrive":
            deadline = self.clock.now() + r % 11 if r % 3 == 0 else None
            job = Job(
                self.next_id,
                arrival=self.clock.now(),
                model="m",
                true_tokens=1 + r % 300,
                deadline=deadline,
            )
            self.next_id += 1
            core.submit(job)
            self.submitted[job.id] = job
        elif op in ("predict", "fail_predict"):
            waiting = [j for j in self.submitted.values() if j.state is JobState.QUEUED]
            if waiting:
                job = waiting[r % len(waiting)]
                if op == "predict":
                    core.on_prediction(job.id, float(1 + r % 500))
                else:
                    core.on_prediction_failed(job.id)
        elif op == "finish" and self.running:
            ids = [i for i in self.running if i not in self.stopping]
            if ids:
                job_id = ids[r % len(ids)]
                _, job = self.running.pop(job_id)
                core.on_finish(job_id, "stop", job.generated + 1)
                self.done_calls[job_id] = self.done_calls.get(job_id, 0) + 1
        elif op == "progress" and self.running:
            job_id = list(self.running)[r % len(self.running)]
            job = self.running[job_id][1]
            core.on_progress(job_id, job.generated + r % 5)
        elif op == "cancel" and self.submitted:
            job_id = r % len(self.submitted)
            stop = core.on_cancel(job_id)
            if stop is not None:
                self.handle([stop])
        elif op == "stopped" and self.stopping:
            job_id = list(self.stopping)[r % len(self.stopping)]
            job = self.stopping.pop(job_id)
            self.running.pop(job_id)
            core.on_stopped(job_id, job.generated)
        elif op == "run_failed" and self.running:
            job_id = list(self.running)[r % len(self.running)]
            self.running.pop(job_id)
            self.stopping.pop(job_id, None)
            core.on_run_failed(job_id)
        elif op == "lose_worker" and core.workers:
            wid = list(core.workers)[r % len(core.workers)]
            for job_id in [i for i, (w, _) in self.running.items() if w == wid]:
                self.running.pop(job_id)
                self.stopping.pop(job_id, None)
            core.on_worker_lost(wid)
        elif op == "add_worker":
            core.add_worker(f"w{self.next_worker}", 1 + r % 4)
            self.next_worker += 1
        self.handle([stop for _, stop in core.expire() if stop is not None])
        self.handle(core.dispatch())

    def drain(self) -> None:
        core = self.core
        if not core.workers:
            core.add_worker("last", 2)
        for job in list(self.submitted.values()):
            if job.state is JobState.QUEUED:
                core.on_prediction(job.id, 10.0)
        for _ in range(10_000):
            for job_id, job in list(self.stopping.items()):
                self.stopping.pop(job_id)
                self.running.pop(job_id)
                core.on_stopped(job_id, job.generated)
            for job_id, (_, job) in list(self.running.items()):
                self.running.pop(job_id)
                core.on_finish(job_id, "stop", job.generated + 1)
                self.done_calls[job_id] = self.done_calls.get(job_id, 0) + 1
            self.clock.advance_to(self.clock.now() + 100.0)
            self.handle(core.dispatch())
            if not self.running and not self.stopping and core.queue_depth == 0:
                break


def make_core(policy: str, mode: BatchingMode) -> tuple[SchedulerCore, Any]:
    clock = VirtualClock()
    slack = policy.startswith("slack:")
    core = SchedulerCore(
        make_policy(
            policy.removeprefix("slack:"),
            allow_oracle=True,
            max_wait_s=3.0,
            jct_target_s=5.0 if slack else 0.0,
            preemption=PreemptionRule(factor=1.5, max_fraction=0.9, max_per_job=2),
        ),
        Batching(mode, max_batch=3, wait_s=1.0),
        clock,
        queue_limit=10_000,
        max_requeues=2,
    )
    core.add_worker("w-initial", 2)
    return core, clock


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=OPS,
    policy=st.sampled_from(POLICIES),
    mode=st.sampled_from(list(BatchingMode)),
)
def test_no_job_is_lost_or_finished_twice(
    ops: list[tuple[str, int]], policy: str, mode: Any
) -> None:
    core, clock = make_core(policy, mode)
    driver = Driver(core, clock)
    for op, r in ops:
        driver.step(op, r)
        # Slots: never more jobs on a worker than its slots.
        for w in core.workers.values():
            assert len(w.jobs) <= w.slots
            assert 0 <= w.used <= w.slots
    driver.drain()
    for job in driver.submitted.values():
        assert job.terminal, f"{job} never ended"
    assert all(n == 1 for n in driver.done_calls.values()), "a job finished twice"
    done = {j.id for j in driver.submitted.values() if j.state is JobState.DONE}
    assert done == set(driver.done_calls)
    assert core.completed == len(done)
    assert core.queue_depth == 0 and core.running == 0 and len(core.queue) == 0
    assert core.free_slots == sum(w.slots for w in core.workers.values())
    assert list(core) == []


@settings(max_examples=150, deadline=None)
@given(
    preds=st.lists(st.integers(1, 1000), min_size=1, max_size=60),
    order=st.randoms(use_true_random=False),
    workers=st.integers(1, 4),
    lost=st.integers(0, 59),
)
def test_fcfs_keeps_arrival_order(preds: list[int], order: Any, workers: int, lost: int) -> None:
    """Whatever order the predictions come in, and even after a worker is lost."""
    clock = VirtualClock()
    core = SchedulerCore(make_policy("fcfs"), Batching(BatchingMode.NONE), clock)
    for i in range(len(preds)):
        core.submit(Job(i, arrival=float(i)))
    ids = list(range(len(preds)))
    order.shuffle(ids)
    for i in ids:
        core.on_prediction(i, float(preds[i]))
    for w in range(workers):
        core.add_worker(w, 1)
    first = core.dispatch()
    before = [d.job.id for d in first]
    assert before == list(range(len(before)))
    if lost < len(first) and workers > 1:
        # A lost worker's job goes back ahead of every job still waiting.
        core.on_worker_lost(first[lost].worker_id)
        before.remove(first[lost].job.id)
    after: list[int] = [d.job.id for d in core.dispatch()]
    while core.running:
        running = sorted(j.id for j in core if j.state is JobState.RUNNING)
        core.on_finish(running[0])
        after += [d.job.id for d in core.dispatch()]
    assert after == sorted(after)
    assert sorted(before + after) == list(range(len(preds)))


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.floats(0, 5), st.integers(1, 1000)), max_size=200),
    bound=st.floats(0.5, 20),
)
def test_bounded_wait_queue_pops_the_oldest_overdue_job_first(
    ops: list[tuple[bool, float, int]], bound: float
) -> None:
    clock = VirtualClock()
    q = BoundedWaitQueue(lambda j: j.predicted, bound, clock)
    live: dict[int, Job] = {}
    for n, (is_push, dt, pred) in enumerate(ops):
        clock.advance_to(clock.now() + dt)
        if is_push:
            job = Job(n, arrival=clock.now())
            job.seq = n
            job.predicted = float(pred)
            job.ready_since = clock.now()
            q.push(job)
            live[n] = job
        else:
            popped = q.pop()
            if not live:
                assert popped is None
                continue
            assert popped is not None
            overdue = [j for j in live.values() if clock.now() - j.ready_since > bound]
            if overdue:
                assert popped is min(overdue, key=lambda j: (j.ready_since, j.seq))
            else:
                best = min(live.values(), key=lambda j: (j.predicted, j.seq))
                assert popped.predicted == best.predicted
            del live[popped.id]
        assert len(q) == len(live)


@settings(max_examples=200, deadline=None)
@given(
    predicted=st.integers(100, 2000),
    progress_fraction=st.floats(0.0, 0.24),
    short=st.integers(1, 20),
)
def test_preempted_job_resumes_with_exactly_its_remaining_tokens(
    predicted: int, progress_fraction: float, short: int
) -> None:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy("ssjf+preempt", preemption=PreemptionRule(4.0, 0.25, 1)),
        Batching(BatchingMode.NONE),
        clock,
    )
    core.add_worker("w", 1)
    long = Job("long", arrival=0.0)
    core.submit(long)
    core.on_prediction("long", float(predicted))
    core.dispatch()
    done = int(progress_fraction * predicted)
    core.on_progress("long", done)
    core.submit(Job("short", arrival=1.0))
    core.on_prediction("short", float(short))
    decisions = core.dispatch()
    if short * 4 >= predicted - done:
        assert decisions == []
        return
    assert decisions == [Stop(long, "w", True)]
    core.on_stopped("long", done)
    assert long.entry is not None and long.entry[0] == max(predicted - done, 1)
    (assign,) = core.dispatch()
    assert assign.job.id == "short"
    core.on_finish("short", "stop", short)
    (again,) = core.dispatch()
    assert again.job is long
    # What the service sends: resume_tokens and the tokens still to generate.
    assert long.generated == done and long.run_start_generated == done
    assert long.preemptions == 1


@pytest.mark.parametrize("state", ["QUEUED", "PREDICTED", "RUNNING", "PREEMPTED", "DONE"])
def test_cancel_in_every_state(state: str) -> None:
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy("ssjf+preempt", preemption=PreemptionRule(2.0, 1.0, 1)),
        Batching(BatchingMode.NONE),
        clock,
    )
    core.add_worker("w", 1)
    job = Job("j", arrival=0.0)
    core.submit(job)
    if state != "QUEUED":
        core.on_prediction("j", 1000.0)
    if state in ("RUNNING", "PREEMPTED", "DONE"):
        core.dispatch()
    if state == "PREEMPTED":
        core.submit(Job("s", arrival=0.0))
        core.on_prediction("s", 1.0)
        (stop,) = core.dispatch()
        assert stop.job is job and job.state is JobState.PREEMPTED
    if state == "DONE":
        core.on_finish("j", "stop", 5)
    assert job.state.name == state
    stop = core.on_cancel("j")
    if state == "DONE":
        assert stop is None and job.state is JobState.DONE
        return
    assert job.state is JobState.CANCELLED
    assert (stop is not None) == (state == "RUNNING")
    if state in ("RUNNING", "PREEMPTED"):
        assert core.free_slots == 0  # held until the worker lets go
        core.on_stopped("j", 3)
    assert job.state is JobState.CANCELLED
    assert core.get("j") is None
    assert core.on_cancel("j") is None  # idempotent
    if state == "PREEMPTED":
        (a,) = core.dispatch()
        assert a.job.id == "s"
    else:
        assert core.dispatch() == []
        assert core.free_slots == 1
