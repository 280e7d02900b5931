"""The request sequence of a benchmark, shared by the live run and the simulator.

Built from the simulator's own pieces (``services.scheduler.sim.workload``):
alpaca_eval prompts of the target model (held-out test split, so the
predictor never trained on them) with their true output lengths, arrivals
from an Azure trace rescaled to the target rate, and the shipped head's
predictions (cached on disk). Two cores cannot replay production lengths
through the real stack, so true lengths are divided by ``length_scale``
(the same for every policy, rounded, at least one token). Predictions stay
in the head's own units: ordering by them is unchanged, and the simulator
sees exactly the same numbers as the live scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.scheduler.sim import workload as wl
from shortline.simulation import real_predictor


@dataclass(frozen=True)
class BenchWorkload:
    prompts: list[str]  # per request
    arrivals: NDArray[np.float64]  # seconds from the first request
    true_tokens: NDArray[np.int64]  # scaled: what the replay model emits
    predicted: NDArray[np.float64]  # the head's prediction, unscaled
    prompt_tokens: NDArray[np.int64]
    unique_index: NDArray[np.int64]  # which unique prompt each request is
    length_scale: float
    lengths_name: str
    arrivals_name: str
    # The predictor's quantiles per request (head units, as ``predicted``), or None.
    quantiles: NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return int(self.arrivals.shape[0])

    def to_sim(self) -> wl.Workload:
        """The same sequence as the simulator's Workload; equal prompts share an id."""
        return wl.Workload(
            arrivals=self.arrivals,
            prompt_tokens=self.prompt_tokens,
            true_tokens=self.true_tokens,
            # In the replayed lengths' unit, as the benchmark-mode scheduler sees them.
            predicted=self.predicted / self.length_scale,
            # The same scaling as the live scheduler's (its --prediction-scale).
            quantiles=None if self.quantiles is None else self.quantiles / self.length_scale,
            prediction_source="predictor",
            info={"lengths": self.lengths_name, "arrivals": self.arrivals_name},
            # The engine draws one embedding per id below the request count: compact them.
            prompt_ids=np.unique(self.unique_index, return_inverse=True)[1].astype(np.int64),
            # No max_tokens cap: the live client's max_tokens is the true length (the
            # replay model emits that many), so the benchmark-mode scheduler ignores it
            # for predictions, and the simulator does the same.
        )


def scale_lengths(tokens: NDArray[np.integer], length_scale: float) -> NDArray[np.int64]:
    """True lengths divided by ``length_scale``, rounded, at least 1."""
    if length_scale < 1:
        raise ValueError(f"length scale must be >= 1, got {length_scale}")
    return np.maximum(1, np.rint(tokens / length_scale)).astype(np.int64)


@dataclass(frozen=True)
class LengthPool:
    """Unique prompts with scaled true lengths and the head's predictions."""

    lengths: wl.LengthSet
    scaled: NDArray[np.int64]
    predicted: NDArray[np.float64]
    length_scale: float
    # The predictor's quantiles (what the live scheduler gets beside each prediction),
    # so the simulated replay of a run orders distribution-aware policies as it did.
    quantiles: NDArray[np.float64] | None = None


def length_pool(target_model: str, length_scale: float, split: str = "test") -> LengthPool:
    lengths = wl.alpaca_lengths(target_model, split)
    predictor = real_predictor()
    predicted, _ = wl.predictions_for(
        "real", lengths, target_model, np.random.default_rng(0), predictor
    )
    try:
        quantiles, _ = wl.distributions_for(
            "real", lengths, predicted, target_model, split, predictor, source="predictor"
        )
    except ValueError:  # heads without a distribution: the live scheduler gets none either
        quantiles = None
    return LengthPool(
        lengths,
        scale_lengths(lengths.true_tokens, length_scale),
        predicted,
        length_scale,
        quantiles,
    )


def build(pool: LengthPool, *, n: int, rate: float, trace: str, seed: int) -> BenchWorkload:
    """``n`` requests at mean rate ``rate`` (req/s); the same seed gives the same prompts."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, pool.scaled.shape[0], size=n).astype(np.int64)
    arrivals = wl.arrival_times(trace, n, rate, np.random.default_rng(seed + 7))
    if n > 1 and arrivals[-1] > 0:
        # The simulator rescales the trace's gaps by the whole hour's mean; the first few
        # hundred gaps of a trace can be far sparser than that, so a short live cell would
        # run well below its target load. Rescale so this sequence itself has mean rate
        # ``rate``; the burst pattern is kept.
        arrivals = arrivals * ((n - 1) / rate) / float(arrivals[-1])
    return BenchWorkload(
        prompts=[pool.lengths.prompts[i] for i in pick],
        arrivals=arrivals,
        true_tokens=pool.scaled[pick],
        predicted=pool.predicted[pick],
        quantiles=None if pool.quantiles is None else pool.quantiles[pick],
        prompt_tokens=pool.lengths.prompt_tokens[pick],
        unique_index=pick,
        length_scale=pool.length_scale,
        lengths_name=pool.lengths.name,
        arrivals_name=f"azure2023/{trace}" if trace != "poisson" else "poisson",
    )
