"""Pure parts of the worker: sampling parameters, prompt formats, slots, and the
continuous-batching engine driven by the real replay backend (no server)."""

from __future__ import annotations

import threading
import time

import pytest
from emissions import Collector

from services.worker.models.engine import ABORT, LENGTH, STOP, BatchEngine, Sequence
from services.worker.models.replay import ReplayBackend
from services.worker.models.sampling import SamplingParams, parse
from services.worker.prompts import format_prompt, parse_models
from services.worker.slots import DuplicateJob, Slots, SlotsFull


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"max_tokens": 0}', "max_tokens"),
        ('{"max_tokens": 10, "temperature": -1}', "temperature"),
        ('{"max_tokens": 10, "top_p": 0}', "top_p"),
        ('{"max_tokens": 10, "top_k": -5}', "top_k"),
        ('{"max_tokens": 10, "stop": [""]}', "stop"),
        ('{"max_tokens": "ten"}', "max_tokens"),
        ("[1, 2]", "sampling_parameters"),
        ("{", "sampling_parameters"),
    ],
)
def test_invalid_sampling_parameters_name_the_field(body: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        parse(body, max_tokens_limit=100)


def test_sampling_parameters_accept_vllm_spellings() -> None:
    p = parse('{"max_tokens": "7", "temperature": "0", "stop": "###", "ignore_eos": "true"}', 100)
    assert p == SamplingParams(max_tokens=7, temperature=0.0, stop=("###",), ignore_eos=True)


def test_prompt_format_appends_resume_text_after_the_template() -> None:
    text = format_prompt("smollm2", "Hi", "Hello! How")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How")
    assert format_prompt("raw", "p", " replay3") == "p replay3"


def test_models_spec_parses_format_and_limit() -> None:
    models = parse_models("a=smollm2:100,b=raw:5,c")
    assert (models["a"].prompt_format, models["a"].max_tokens) == ("smollm2", 100)
    assert models["c"].prompt_format == "raw"
    with pytest.raises(ValueError, match="prompt format"):
        parse_models("a=nope:1")


def test_slots_refuse_when_full_and_reuse_after_release() -> None:
    slots = Slots(2)
    a = slots.acquire("a", "m")
    slots.acquire("b", "m")
    with pytest.raises(SlotsFull):
        slots.acquire("c", "m")
    with pytest.raises(DuplicateJob):
        slots.acquire("a", "m")
    slots.release(a)
    assert slots.used == 1
    assert a.done.is_set()
    slots.acquire("c", "m")


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
