"""The online accuracy window replayed in the simulator: the share of the oracle's gain.

The closed-form order gain (``core/accuracy.py``) queues a window's requests all at
once on one server; what the live scheduler gains depends on arrivals, batching,
preemption and its own policy (aging, latest starts). This replays the window's
finished requests at their arrival times (the scheduler's clock) through the same
core on a virtual clock three ways: ``fcfs``, the scheduler's own policy queueing
each request by its recorded prediction, and ``sjf-oracle`` by its true length, and
reports ``(fcfs mean JCT - policy's) / (fcfs's - oracle's)``: 1 the oracle's
schedule, 0 no better than arrival order, below 0 worse; NaN when the oracle gains
nothing over fcfs (an idle window, where no request ever waits for another).

The service model matches the deployment (:class:`Deployment`): the registered
workers and their usable slots, the batching mode, and a decode step of the observed
seconds per generated token with no per-sequence term (the observed figure already
holds the live batch's occupancy), no prefill (also in the observed figure), so the
replay carries the live load.

A window holds several (source, head) groups (a head version, the fallback, cache
hits): a group's figure replays the whole window with that group's requests queued
by their predictions and every other request by its true length, so that only that
group's errors can lose any of the window's gain. Its figure is therefore the share
of the window's oracle gain kept despite that group's errors (one minus it: what
they cost), and with a single group it is the whole window's figure. A small group
can only cost a little; its tau and MAE say how good its predictions are.

Not modelled: requests of other length models that shared the workers, requests
that were cancelled or failed (absent from the window), priority bands and tenants
(one band), length distributions (ssjf-risk and ssjf-gittins order by the point).
Cost: ``len(groups) + 2`` simulations of at most the window (one group: 3); on
500 requests about 4.5 ms each on this project's 2-core machine (15 ms with one
group, 50 ms with eight), pure Python, so a caller runs it off its event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.scheduler.core.batching import Batching
from services.scheduler.core.policies import Policy, make_policy
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.service_model import RUNNING, ServiceModel
from services.scheduler.sim.workload import Workload

# A replay gains nothing measurable when the oracle's mean JCT is within this share of
# fcfs's (floating-point noise of a window whose requests never waited).
MIN_GAIN = 1e-9

_FCFS = make_policy("fcfs")
_ORACLE = make_policy("sjf-oracle", allow_oracle=True)


@dataclass(frozen=True)
class Deployment:
    """What the replay serves on: the live scheduler's policy and workers."""

    policy: Policy
    batching: Batching
    workers: int
    slots: int  # usable slots per worker (the core's WorkerSlots.slots)
    token_time_s: float  # observed seconds per generated token on a worker

    def __post_init__(self) -> None:
        if self.workers < 1 or self.slots < 1:
            raise ValueError("a replay needs at least one worker with one slot")
        if not self.token_time_s > 0.0:
            raise ValueError(f"token_time_s must be > 0, got {self.token_time_s}")

    @property
    def model(self) -> ServiceModel:
        return ServiceModel(step_a_s=self.token_time_s, step_b_s=0.0, dynamic_charge=RUNNING)


@dataclass(frozen=True)
class Replay:
    """Each group's replayed share of the oracle's gain, and what computing it took."""

    gains: list[float]  # per group code
    requests: int
    fcfs_mean_jct_s: float
    oracle_mean_jct_s: float
    simulations: int
    seconds: float  # wall time of the whole replay


def _mean_jct(
    arrival: NDArray[np.float64],
    actual: NDArray[np.int64],
    predicted: NDArray[np.float64],
    policy: Policy,
    deployment: Deployment,
) -> float:
    work = Workload(
        arrivals=arrival,
        prompt_tokens=np.zeros(arrival.shape[0], np.int64),
        true_tokens=actual,
        predicted=predicted,
        prediction_source="predictor",
    )
    run = simulate(
        work,
        policy,
        deployment.batching,
        workers=deployment.workers,
        slots=deployment.slots,
        model=deployment.model,
    )
    return float(np.mean(run.finish - run.arrival))


def _share(fcfs: float, policy: float, oracle: float) -> float:
    gain = fcfs - oracle
    if not gain > MIN_GAIN * fcfs:
        return float("nan")
    return (fcfs - policy) / gain


def replay_gains(
    arrival: NDArray[np.float64],
    predicted: NDArray[np.float64],
    actual: NDArray[np.float64],
    codes: NDArray[np.int64],
    groups: int,
    deployment: Deployment,
) -> Replay:
    """Replays one window (see the module's docstring); ``codes`` give each request's
    group in ``range(groups)``. Pure apart from the wall time it reports."""
    started = time.perf_counter()
    n = arrival.shape[0]
    if n < 2:
        return Replay([float("nan")] * groups, n, float("nan"), float("nan"), 0, 0.0)
    order = np.argsort(arrival, kind="stable")
    arr = arrival[order] - arrival[order][0]
    pred = np.maximum(predicted[order].astype(np.float64), 1.0)
    true = np.maximum(np.rint(actual[order]), 1.0).astype(np.int64)
    code = codes[order]
    truth = true.astype(np.float64)
    fcfs = _mean_jct(arr, true, pred, _FCFS, deployment)
    oracle = _mean_jct(arr, true, truth, _ORACLE, deployment)
    present = sorted(set(code.tolist()))
    gains = [float("nan")] * groups
    runs = 2
    for g in present:
        # Only this group's errors: the rest queued by the truth (all of them with one group).
        own = pred if len(present) == 1 else np.where(code == g, pred, truth)
        gains[g] = _share(fcfs, _mean_jct(arr, true, own, deployment.policy, deployment), oracle)
        runs += 1
    return Replay(gains, n, fcfs, oracle, runs, time.perf_counter() - started)


def replay_gain(
    arrival: NDArray[np.float64],
    predicted: NDArray[np.float64],
    actual: NDArray[np.float64],
    deployment: Deployment,
) -> float:
    """The whole window's replayed share of the oracle's gain (one group)."""
    codes = np.zeros(arrival.shape[0], np.int64)
    return replay_gains(arrival, predicted, actual, codes, 1, deployment).gains[0]
