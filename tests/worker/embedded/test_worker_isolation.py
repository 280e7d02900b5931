"""One sequence's failure never fails the others of its batch (in-process engine,
no Triton): values that slipped past validation (a denormal temperature or
repetition penalty, a seed torch cannot take) and a client that went away each
end, at most, their own sequence."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from emissions import Collector

from services.worker.sampling import SamplingParams
from services.worker.triton.engine import LENGTH, STOP, BatchEngine, Sequence
from services.worker.triton.replay import ReplayBackend
from services.worker.triton.smollm2 import SmolLM2Backend

DENORMAL = 1.4e-45


def _gone() -> bool:
    raise RuntimeError("response sender closed")


def test_replay_batch_survives_a_huge_resume_number_and_a_dead_client() -> None:
    engine = BatchEngine(ReplayBackend(1.0, 0.1))
    engine.start()
    try:
        # int() of a 5000-digit number raises: it used to fail every sequence's step.
        huge, dead = Collector(), Collector()
        engine.submit(
            Sequence("huge", "go replay" + "9" * 5000, SamplingParams(max_tokens=3), huge)
        )
        engine.submit(Sequence("dead", "go", SamplingParams(max_tokens=50), dead, _gone))
        innocent = [Collector() for _ in range(8)]
        for i, out in enumerate(innocent):
            engine.submit(Sequence(f"ok{i}", "go", SamplingParams(max_tokens=4), out))
        for out in [huge, *innocent]:
            assert out.done.wait(10)
        for out in innocent:
            assert out.text == " replay1 replay2 replay3 replay4"
            assert out.emissions[-1].finish_reason == LENGTH
        assert huge.text == " replay1 replay2 replay3"
        # The engine thread is still alive after the failing cancel check.
        late = Collector()
        engine.submit(Sequence("late", "go", SamplingParams(max_tokens=2), late))
        assert late.done.wait(10) and late.text == " replay1 replay2"
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def smollm2() -> Iterator[SmolLM2Backend]:
    yield SmolLM2Backend(precision="bf16", max_batch=16)


@pytest.mark.slow
def test_denormal_sampling_values_beside_eight_innocent_sequences(smollm2: SmolLM2Backend) -> None:
    """Validation is bypassed (the engine's own SamplingParams): a temperature of
    1.4e-45 makes torch's softmax nan, which used to fail the whole batch's step."""
    engine = BatchEngine(smollm2)
    engine.start()
    try:
        prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
        bad = {
            "temperature": Collector(),
            "penalty": Collector(),
            "seed": Collector(),  # torch's generator refuses it: the prefill fails
        }
        engine.submit(
            Sequence(
                "t", prompt, SamplingParams(max_tokens=4, temperature=DENORMAL), bad["temperature"]
            )
        )
        engine.submit(
            Sequence(
                "r",
                prompt,
                SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=DENORMAL),
                bad["penalty"],
            )
        )
        engine.submit(Sequence("s", prompt, SamplingParams(max_tokens=4, seed=2**64), bad["seed"]))
        innocent = [Collector() for _ in range(8)]
        for i, out in enumerate(innocent):
            params = SamplingParams(max_tokens=4, temperature=0.7, seed=i, ignore_eos=True)
            engine.submit(Sequence(f"ok{i}", prompt, params, out))
        for out in [*innocent, *bad.values()]:
            assert out.done.wait(180)
        for out in innocent:
            assert not any(e.error for e in out.emissions)
            assert out.emissions[-1].finish_reason == LENGTH
            assert sum(e.tokens for e in out.emissions) == 4
            assert max(e.batch_size for e in out.emissions) >= 9  # they shared steps
        # The numerically bad ones fell back to greedy and finished normally.
        for name in ("temperature", "penalty"):
            assert not any(e.error for e in bad[name].emissions), name
            assert bad[name].emissions[-1].finish_reason in (LENGTH, STOP)
        # The unseedable one failed alone, with a message and no traceback text.
        errors = [e.error for e in bad["seed"].emissions if e.error]
        assert errors and errors[0].startswith("prefill failed")
    finally:
        engine.stop()
