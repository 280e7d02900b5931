"""The benchmark's request sequence: scaled lengths, trace arrivals at a target rate."""

from __future__ import annotations

import numpy as np
import pytest

from shortline.benchmark.workload import scale_lengths


def test_scaled_lengths_round_and_never_reach_zero() -> None:
    got = scale_lengths(np.array([1, 4, 5, 15, 1000]), 10.0)
    assert got.tolist() == [1, 1, 1, 2, 100]
    with pytest.raises(ValueError, match="length scale"):
        scale_lengths(np.array([10]), 0.5)


def test_a_short_trace_sequence_runs_at_its_target_rate() -> None:
    from services.scheduler.sim.workload import LengthSet
    from shortline.benchmark.workload import LengthPool, build

    lengths = LengthSet(
        prompts=["a", "b", "c"],
        prompt_tokens=np.array([3, 4, 5]),
        true_tokens=np.array([100, 200, 300]),
        name="test",
    )
    pool = LengthPool(
        lengths, scale_lengths(lengths.true_tokens, 10), np.array([90.0, 210, 330]), 10
    )
    work = build(pool, n=50, rate=2.0, trace="conv", seed=3)
    assert work.arrivals[0] == 0.0
    assert work.arrivals[-1] == pytest.approx(49 / 2.0)
    gaps = np.diff(work.arrivals)
    assert gaps.std() / gaps.mean() > 0.5  # the trace's burstiness survives the rescaling
    # Each request carries its own prompt's scaled length and unscaled prediction.
    for i in range(50):
        j = work.unique_index[i]
        assert work.prompts[i] == lengths.prompts[j]
        assert work.true_tokens[i] == [10, 20, 30][j]
        assert work.predicted[i] == [90.0, 210, 330][j]
    sim = work.to_sim()
    # The simulated scheduler, like the benchmark-mode one, sees predictions in the
    # replayed lengths' unit, so remaining = predicted - generated is in one unit.
    assert sim.predicted.tolist() == (work.predicted / 10).tolist()
    assert sim.prompt_ids is not None and int(sim.prompt_ids.max()) < 50
    # The live client's max_tokens is the true length, which the benchmark-mode
    # scheduler does not cap predictions at: the simulator's copy carries no cap either.
    assert sim.max_tokens is None
