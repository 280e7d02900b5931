"""The continuous-batching engine driven by the real replay backend (no Triton)."""

from __future__ import annotations

import threading
import time

from emissions import Collector

from services.worker.sampling import SamplingParams
from services.worker.triton.engine import ABORT, LENGTH, STOP, BatchEngine, Sequence
from services.worker.triton.replay import ReplayBackend


def _engine(a_ms: float = 2.0, b_ms: float = 0.5) -> BatchEngine:
    engine = BatchEngine(ReplayBackend(a_ms, b_ms))
    engine.start()
    return engine


def test_replay_engine_emits_exactly_max_tokens_and_continues_numbering() -> None:
    engine = _engine()
    try:
        fresh, resumed = Collector(), Collector()
        engine.submit(Sequence("1", "prompt", SamplingParams(max_tokens=5), fresh))
        engine.submit(
            Sequence("2", "prompt replay1 replay2", SamplingParams(max_tokens=2), resumed)
        )
        assert fresh.done.wait(5) and resumed.done.wait(5)
        assert fresh.text == " replay1 replay2 replay3 replay4 replay5"
        assert sum(e.tokens for e in fresh.emissions) == 5
        assert fresh.emissions[-1].finish_reason == LENGTH
        assert resumed.text == " replay3 replay4"
    finally:
        engine.stop()


def test_stop_string_ends_generation_without_sending_it() -> None:
    engine = _engine()
    try:
        out = Collector()
        engine.submit(Sequence("1", "p", SamplingParams(max_tokens=9, stop=(" replay3",)), out))
        assert out.done.wait(5)
        assert out.text == " replay1 replay2"
        assert out.emissions[-1].finish_reason == STOP
    finally:
        engine.stop()


def test_sequences_share_steps_and_cancellation_takes_effect_within_a_step() -> None:
    engine = _engine(a_ms=10.0, b_ms=0.0)
    try:
        cancelled = threading.Event()
        long, short = Collector(), Collector()
        engine.submit(
            Sequence("long", "p", SamplingParams(max_tokens=1000), long, cancelled.is_set)
        )
        engine.submit(Sequence("short", "p", SamplingParams(max_tokens=5), short))
        assert short.done.wait(5)
        steps_long = {e.step for e in long.emissions}
        assert {e.step for e in short.emissions} <= steps_long
        assert max(e.batch_size for e in short.emissions) == 2
        cancelled.set()
        at = len(long.emissions)
        assert long.done.wait(2)
        assert long.emissions[-1].finish_reason == ABORT
        # The step running when the flag was set may still deliver one token.
        assert len(long.emissions) - 1 <= at + 1
        time.sleep(0.05)
        assert engine.step_count == long.emissions[-2].step  # the loop went idle
    finally:
        engine.stop()
