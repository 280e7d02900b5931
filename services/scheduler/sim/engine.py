"""The event loop: arrivals and worker completions under a virtual clock.

No per-token events: a worker's batch is a fluid of decode steps. Each worker
keeps ``s0`` steps done at time ``t0`` and the current step length
``d = a + b * n``; a job finishes when the worker's step count reaches the
step it joined at plus its tokens, so the worker's next completion time is
``t0 + (min finish step - s0) * d``, recomputed only when its batch changes.
Prefill (and recompute on resume) stalls that worker's decoding. A dynamic
batch is charged for ``occ`` sequences: with ``ServiceModel.dynamic_charge``
"padded" the most it has held since it started (so finished jobs keep costing
until the last one ends), with "running" only those still running. Stale worker
events are skipped by version number. Arrivals are sorted already and merged
with the event heap instead of being pushed into it.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.scheduler.core.bands import BandSettings
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.interface import Assign
from services.scheduler.core.job import Job
from services.scheduler.core.policies import Policy
from services.scheduler.core.scheduler import SchedulerCore
from services.scheduler.sim.service_model import ServiceModel
from services.scheduler.sim.workload import Workload
from shortline.common.length_distribution import LengthDistribution, as_distribution

_EPS = 1e-7  # steps


class _Worker:
    __slots__ = ("d", "heap", "n", "occ", "s0", "t0", "version")

    def __init__(self, d: float) -> None:
        self.t0 = 0.0  # decoding continues from here (later than now while prefilling)
        self.s0 = 0.0  # steps done at t0
        self.d = d  # current step length
        self.n = 0  # jobs running here
        self.occ = 0  # batch size the step length is charged for
        self.heap: list[tuple[float, int, int]] = []  # (finish step, job index, run token)
        self.version = 0


@dataclass
class RunResult:
    policy: str
    batching: str
    arrival: NDArray[np.float64]
    first_dispatch: NDArray[np.float64]
    first_token: NDArray[np.float64]
    finish: NDArray[np.float64]
    tokens: NDArray[np.int64]
    preemptions: int
    wall_seconds: float
    events: int
    cache_lookups: int = 0
    cache_hits: int = 0
    late_jobs: int = 0  # ssjf-aging: jobs that reached their latest start
    token_time_s: float = 0.0  # ssjf-aging: seconds per predicted token at the end
    priority: NDArray[np.int64] | None = None  # the workload's bands, when it has them
    tenant: list[str] | None = None


def simulate(
    workload: Workload,
    policy: Policy,
    batching: Batching,
    *,
    workers: int,
    slots: int,
    model: ServiceModel,
    cache: SemanticCache | None = None,
    bands: BandSettings | None = None,
) -> RunResult:
    """Runs every request of ``workload`` to completion; returns per-request times.

    With ``cache`` and a workload with ``prompt_ids``, each distinct prompt gets a
    random unit embedding (16 dimensions: distinct ones never come near the
    threshold), so the core's semantic cache finds exactly the repeats that it
    still holds.
    """
    started = time.perf_counter()
    n_jobs = len(workload)
    clock = VirtualClock()
    a = model.step_a_s
    b = model.step_b_s
    pf = model.prefill_per_token_s
    ro = model.run_overhead_s
    dynamic = batching.mode is BatchingMode.DYNAMIC
    # A padded dynamic batch keeps paying for its finished jobs until its last one ends.
    padded = dynamic and model.dynamic_padded
    ws = [_Worker(a) for _ in range(workers)]
    jd = model.join_delay_s
    s_join = [0.0] * n_jobs
    token_of = [-1] * n_jobs  # run token of the live run, -1 when not running
    joined = [True] * n_jobs  # False while a dispatched run waits out the join delay

    def progress(job: Job) -> int:
        # The core asks within the dispatch that assigned the run (its preemption check
        # follows its starts), before this loop has seen the Assign: that run has not begun,
        # and s_join holds nothing of it (0 for a first run: the worker's whole step count
        # would read as this job's tokens).
        if token_of[job.id] != job.run_token or not joined[job.id]:
            return job.run_start_generated
        w = ws[job.worker]
        now = clock.t
        s = w.s0 + (now - w.t0) / w.d if now > w.t0 else w.s0
        return job.run_start_generated + max(0, int(s - s_join[job.id] + _EPS))

    core = SchedulerCore(
        policy,
        batching,
        clock,
        queue_limit=n_jobs + 1,
        progress=progress,
        cache=cache,
        bands=bands,
    )
    embeddings: Any = None
    ids: list[int] | None = None
    if cache is not None and workload.prompt_ids is not None:
        vecs = np.random.default_rng(12345).standard_normal((n_jobs, 16)).astype(np.float32)
        embeddings = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        ids = workload.prompt_ids.tolist()
    for wid in range(workers):
        core.add_worker(wid, slots)

    arrivals = workload.arrivals.tolist()
    ptoks = workload.prompt_tokens.tolist()
    ttoks = workload.true_tokens.tolist()
    caps = workload.max_tokens.tolist() if workload.max_tokens is not None else None
    preds = workload.predicted.tolist()
    source = workload.prediction_source
    prios = workload.priority.tolist() if workload.priority is not None else None
    tenants = workload.tenant
    qs: list[Any] = [None] * n_jobs
    if workload.quantiles is not None:
        # One distribution per distinct row, built before the clock starts (the service
        # builds it when the prediction arrives; here many requests repeat a prompt).
        built: dict[tuple[float, ...], LengthDistribution | None] = {}
        for k, row in enumerate(workload.quantiles.tolist()):
            key = tuple(row)
            if key not in built:
                built[key] = as_distribution(key)
            qs[k] = built[key]
    first_token = [np.nan] * n_jobs
    finish = [np.nan] * n_jobs
    first_dispatch = [np.nan] * n_jobs

    events: list[tuple[float, int, int, int]] = []  # (time, tiebreak, worker or -1, version)
    push = heapq.heappush
    pop = heapq.heappop
    submit = core.submit
    on_prediction = core.on_prediction
    dispatch = core.dispatch
    on_finish = core.on_finish
    on_stopped = core.on_stopped
    tiebreak = 0
    timer_at = -1.0
    n_events = 0
    touched: dict[int, _Worker] = {}
    new_runs: list[tuple[int, int]] = []

    join_worker = [0] * n_jobs
    join_generated = [0] * n_jobs

    def start_run(idx: int, wid: int, generated: int, run_token: int, now: float) -> None:
        """The run joins its worker's batch now (the worker is advanced to ``now``)."""
        w = ws[wid]
        # Prefill of the prompt, plus what a resumed job recomputes.
        w.t0 = (w.t0 if w.t0 > now else now) + pf * (ptoks[idx] + generated) + ro
        w.n += 1
        joined[idx] = True
        s_join[idx] = w.s0
        push(w.heap, (w.s0 + (ttoks[idx] - generated), idx, run_token))
        if generated == 0 and first_token[idx] != first_token[idx]:  # NaN: the first run
            new_runs.append((idx, wid))
        touched[wid] = w

    i = 0
    while True:
        if i < n_jobs and (not events or arrivals[i] <= events[0][0]):
            now = arrivals[i]
            clock.t = now
            job = (
                Job(
                    i,
                    arrival=now,
                    prompt_tokens=ptoks[i],
                    true_tokens=ttoks[i],
                )
                if caps is None
                else Job(
                    i,
                    arrival=now,
                    prompt_tokens=ptoks[i],
                    max_tokens=caps[i],
                    true_tokens=ttoks[i],
                )
            )
            if prios is not None:
                job.priority = prios[i]
            if tenants is not None:
                job.tenant = tenants[i]
            submit(job)
            if ids is None:
                on_prediction(i, preds[i], source, None, qs[i])
            else:
                on_prediction(i, preds[i], source, embeddings[ids[i]], qs[i])
            i += 1
        elif events:
            now, _, wid, version = pop(events)
            n_events += 1
            clock.t = now
            if wid >= 0:
                w = ws[wid]
                if version != w.version:
                    continue
                # Advance to now and retire every job whose last step is done.
                if now > w.t0:
                    w.s0 += (now - w.t0) / w.d
                    w.t0 = now
                heap = w.heap
                limit = w.s0 + _EPS
                while heap and heap[0][0] <= limit:
                    _, idx, tok = pop(heap)
                    if token_of[idx] != tok:
                        continue
                    token_of[idx] = -1
                    finish[idx] = now
                    on_finish(idx, "stop", ttoks[idx])
                    w.n -= 1
                touched[wid] = w
            elif wid == -1:
                timer_at = -1.0
            else:  # a run whose join delay is over starts decoding
                idx = -2 - wid
                if token_of[idx] != version:
                    continue  # preempted before it joined
                w = ws[join_worker[idx]]
                if now > w.t0:
                    w.s0 += (now - w.t0) / w.d
                    w.t0 = now
                start_run(idx, join_worker[idx], join_generated[idx], version, now)
        else:
            break

        decisions = dispatch()
        while decisions:
            stopped = False
            for dec in decisions:
                job = dec.job
                idx = job.id
                wid = dec.worker_id
                w = ws[wid]
                now = clock.t
                if now > w.t0:
                    w.s0 += (now - w.t0) / w.d
                    w.t0 = now
                if type(dec) is Assign:
                    if first_dispatch[idx] != first_dispatch[idx]:  # NaN: the first run
                        first_dispatch[idx] = now
                    token_of[idx] = job.run_token
                    if jd > 0.0:
                        # The slot is taken now; the batch gains the job only later.
                        joined[idx] = False
                        join_worker[idx] = wid
                        join_generated[idx] = job.generated
                        tiebreak += 1
                        push(events, (now + jd, tiebreak, -2 - idx, job.run_token))
                        continue
                    start_run(idx, wid, job.generated, job.run_token, now)
                else:  # a Stop: in the simulator always a preemption
                    if joined[idx]:
                        done = job.run_start_generated + max(0, int(w.s0 - s_join[idx] + _EPS))
                        w.n -= 1
                        touched[wid] = w
                    else:
                        done = job.run_start_generated
                        joined[idx] = True
                    token_of[idx] = -1
                    on_stopped(idx, min(done, ttoks[idx] - 1))
                    stopped = True
            # A preemption freed a slot: the next dispatch fills it at once.
            decisions = dispatch() if stopped else []
        for wid, w in touched.items():
            w.occ = w.n if not padded or w.n == 0 or w.n > w.occ else w.occ
            w.d = a + b * w.occ if w.occ else a + b
            w.version += 1
            heap = w.heap
            while heap and token_of[heap[0][1]] != heap[0][2]:
                pop(heap)
            if heap:
                tiebreak += 1
                push(events, (w.t0 + (heap[0][0] - w.s0) * w.d, tiebreak, wid, w.version))
        touched.clear()
        for idx, wid in new_runs:
            # Known once the batch's step length and prefill stalls are settled.
            w = ws[wid]
            first_token[idx] = w.t0 + (s_join[idx] + 1.0 - w.s0) * w.d
        new_runs.clear()
        if dynamic:
            t = core.next_timer()
            if t is not None and t > clock.t and t != timer_at:
                timer_at = t
                tiebreak += 1
                push(events, (t, tiebreak, -1, 0))

    stats = core.stats()
    return RunResult(
        policy=policy.name,
        batching=batching.mode.value,
        arrival=workload.arrivals,
        first_dispatch=np.asarray(first_dispatch),
        first_token=np.asarray(first_token),
        finish=np.asarray(finish),
        tokens=workload.true_tokens,
        preemptions=core.preemptions,
        wall_seconds=time.perf_counter() - started,
        events=n_events + n_jobs,
        cache_lookups=cache.lookups if cache is not None else 0,
        cache_hits=cache.hits if cache is not None else 0,
        late_jobs=stats.late_jobs,
        token_time_s=stats.token_time_s,
        priority=workload.priority,
        tenant=workload.tenant,
    )
