"""How long a worker takes: the simulator's service-time model, and capacity.

A worker with ``n`` sequences in its batch advances every one of them by one
token per decode step of ``step_a + step_b * n`` seconds (continuous
batching). Starting a job first prefills its prompt, ``prefill_per_token``
seconds per prompt token (plus, on a resume by recompute, per token already
generated), during which that worker's batch does not decode.

Capacity (requests/s) is the throughput limit of this model when every usable
slot of every worker is always busy, computed on the workload's own lengths:

- none (one job per worker): ``workers / E[prefill + L * (a + b)]``
- continuous, K slots: ``workers / E[prefill + L * (a + b*K) / K]``
  (each of K concurrent jobs gets 1/K of every step)
- dynamic, batches of B: ``workers * B / (B * E[prefill] + E[max of B lengths] * (a + b*B))``
  (a batch runs until its longest job ends; E[max] estimated by resampling)

A target load rho sets the mean arrival rate to ``rho * capacity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.scheduler.core.batching import Batching, BatchingMode


@dataclass(frozen=True)
class ServiceModel:
    step_a_s: float = 0.020
    step_b_s: float = 0.002
    prefill_per_token_s: float = 0.0
    # Fixed cost of starting a run on a worker (dispatch, stream set-up), stalling that
    # worker like prefill; shortline bench measures it on the live stack (default 0).
    run_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if (
            self.step_a_s < 0
            or self.step_b_s < 0
            or self.prefill_per_token_s < 0
            or self.run_overhead_s < 0
        ):
            raise ValueError("service-time parameters must be >= 0")
        if self.step_a_s + self.step_b_s <= 0:
            raise ValueError("a decode step must take some time: step_a + step_b > 0")

    def step(self, batch: int) -> float:
        return self.step_a_s + self.step_b_s * batch


def capacity(
    model: ServiceModel,
    batching: Batching,
    workers: int,
    slots: int,
    true_tokens: NDArray[np.integer],
    prompt_tokens: NDArray[np.integer],
    seed: int = 0,
) -> float:
    """Requests per second the cluster sustains with every slot busy (see module doc)."""
    lengths = true_tokens.astype(np.float64)
    prefill = model.prefill_per_token_s * float(np.mean(prompt_tokens))
    k = batching.usable_slots(slots)
    if batching.mode is BatchingMode.DYNAMIC and k > 1:
        rng = np.random.default_rng(seed)
        draws = rng.choice(lengths, size=(20_000, k), replace=True)
        e_max = float(draws.max(axis=1).mean())
        per_batch = k * prefill + e_max * model.step(k)
        return workers * k / per_batch
    per_job = prefill + float(lengths.mean()) * model.step(k) / k
    return workers / per_job
