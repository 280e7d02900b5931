"""How long a worker takes: the simulator's service-time model, and capacity.

A worker with ``n`` sequences in its batch advances every one of them by one
token per decode step of ``step_a + step_b * n`` seconds (continuous
batching). Starting a job first prefills its prompt, ``prefill_per_token``
seconds per prompt token (plus, on a resume by recompute, per token already
generated), during which that worker's batch does not decode.

A dynamic batch holds its worker until its last job ends either way; what its
steps cost is a property of the engine, set by ``dynamic_charge``:

- ``padded`` (the default): every step is charged for all ``B`` sequences
  until the longest one ends, as on a GPU without iteration-level scheduling
  (static batching with padding: a finished row keeps its place in the
  tensor). The at-scale and reference figures use this: it is what dynamic
  batching means where the SSJF paper compares it with continuous batching.
- ``running``: every step is charged only for the sequences still running,
  ``a + b * running``, slots still freed only when the batch ends. This is
  what the live stack does: the replay engine (``services/worker/triton/replay.py``)
  drops a finished sequence before its next step, while the scheduler core
  holds the worker's slots until the batch's last job ends. The simulator run
  beside the live cells, and the capacity that sets their arrival rate, use it.

Capacity (requests/s) is the throughput limit of this model when every usable
slot of every worker is always busy, computed on the workload's own lengths:

- none (one job per worker): ``workers / E[prefill + L * (a + b)]``
- continuous, K slots: ``workers / E[prefill + L * (a + b*K) / K]``
  (each of K concurrent jobs gets 1/K of every step)
- dynamic, batches of B (E[max] estimated by resampling):
  padded ``workers * B / (B * E[prefill] + E[max of B lengths] * (a + b*B))``;
  running-only ``workers * B / (B * E[prefill] + E[max of B lengths] * a + B * E[L] * b)``
  (the batch lasts as many steps as its longest job; the ``b`` part of a step
  is paid once per token generated)

A target load rho sets the mean arrival rate to ``rho * capacity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from services.scheduler.core.batching import Batching, BatchingMode

DynamicCharge = Literal["padded", "running"]
PADDED: DynamicCharge = "padded"
RUNNING: DynamicCharge = "running"
DYNAMIC_CHARGES: tuple[DynamicCharge, ...] = (PADDED, RUNNING)


def parse_dynamic_charge(name: str) -> DynamicCharge:
    for charge in DYNAMIC_CHARGES:
        if name == charge:
            return charge
    raise ValueError(f"dynamic charge must be one of {', '.join(DYNAMIC_CHARGES)}, got {name!r}")


@dataclass(frozen=True)
class ServiceModel:
    step_a_s: float = 0.020
    step_b_s: float = 0.002
    prefill_per_token_s: float = 0.0
    # Fixed cost of starting a run on a worker (dispatch, stream set-up), stalling that
    # worker like prefill; shortline bench measures it on the live stack (default 0).
    run_overhead_s: float = 0.0
    # Time from dispatch until a run joins its worker's batch, its slot held meanwhile while
    # the batch keeps decoding: on the live stack, the Execute call's way to the engine plus
    # the wait for the next step boundary (shortline bench measures it; default 0).
    join_delay_s: float = 0.0
    # How a dynamic batch's steps are charged (module doc): "padded" for all B sequences
    # until the longest ends, "running" for the ones still running (the live replay engine).
    dynamic_charge: DynamicCharge = PADDED

    def __post_init__(self) -> None:
        if (
            self.step_a_s < 0
            or self.step_b_s < 0
            or self.prefill_per_token_s < 0
            or self.run_overhead_s < 0
            or self.join_delay_s < 0
        ):
            raise ValueError("service-time parameters must be >= 0")
        if self.step_a_s + self.step_b_s <= 0:
            raise ValueError("a decode step must take some time: step_a + step_b > 0")
        if self.dynamic_charge not in DYNAMIC_CHARGES:
            raise ValueError(
                f"dynamic_charge must be one of {', '.join(DYNAMIC_CHARGES)}, "
                f"got {self.dynamic_charge!r}"
            )

    def step(self, batch: int) -> float:
        return self.step_a_s + self.step_b_s * batch

    @property
    def dynamic_padded(self) -> bool:
        return self.dynamic_charge == PADDED


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
        if model.dynamic_padded:
            decode = e_max * model.step(k)
        else:
            decode = e_max * model.step_a_s + float(draws.sum(axis=1).mean()) * model.step_b_s
        return workers * k / (k * prefill + decode)
    per_job = prefill + float(lengths.mean()) * model.step(k) / k
    return workers / per_job
