"""SmolLM2 in the continuous-batching engine, in-process (no Triton): the batched,
in-place KV cache must not change what the model says."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from emissions import Collector

from services.worker.sampling import SamplingParams
from services.worker.triton.engine import BatchEngine, Sequence
from services.worker.triton.smollm2 import GrowingLayer, SmolLM2Backend, growing_cache


def test_growing_layer_equals_concatenation_and_grows() -> None:
    k0, v0 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    layer = GrowingLayer(k0, v0, spare=2)
    keys, values = k0, v0
    for _ in range(7):  # past the spare columns: the buffer is reallocated
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        got_k, got_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], -2), torch.cat([values, v], -2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert layer.get_seq_length() == 12
    cache = growing_cache([(k0, v0)])
    assert cache.get_seq_length() == 5


@pytest.fixture(scope="module", params=["bf16", "fp32"])
def backend(request: pytest.FixtureRequest) -> Iterator[SmolLM2Backend]:
    yield SmolLM2Backend(precision=request.param)


def _chat(backend: SmolLM2Backend, question: str) -> str:
    return str(
        backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    )


def _generate(backend: SmolLM2Backend, prompt: str, max_new_tokens: int) -> list[int]:
    ids = backend.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model: Any = backend.model
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = [int(t) for t in out[0, ids.shape[1] :]]
    while tokens and backend.is_eos(tokens[-1]):
        tokens.pop()
    return tokens


@pytest.mark.slow
def test_lone_greedy_sequence_equals_model_generate(backend: SmolLM2Backend) -> None:
    engine = BatchEngine(backend)
    engine.start()
    try:
        prompt = _chat(backend, "What is the capital of France?")
        out = Collector()
        seq = Sequence("a", prompt, SamplingParams(max_tokens=24, temperature=0.0), out)
        engine.submit(seq)
        assert out.done.wait(120)
        assert seq.token_ids == _generate(backend, prompt, 24)
        assert "Paris" in out.text
    finally:
        engine.stop()


@pytest.mark.slow
def test_batched_sequences_with_joins_give_sensible_answers(backend: SmolLM2Backend) -> None:
    """Different prompt lengths (left padding), a join mid-flight and a leave:
    every answer stays the model's own (within float noise of batching)."""
    engine = BatchEngine(backend)
    engine.start()
    try:
        sleep_prompt = _chat(backend, "Give me three tips for a good night's sleep.")
        paris_prompt = _chat(backend, "What is the capital of France?")
        first, second, third = Collector(), Collector(), Collector()
        long = Sequence("s", sleep_prompt, SamplingParams(max_tokens=48, temperature=0.0), first)
        engine.submit(long)
        engine.submit(
            Sequence("p", paris_prompt, SamplingParams(max_tokens=12, temperature=0.0), second)
        )
        assert second.done.wait(120)  # left while the sleep answer still runs
        late = Sequence("q", paris_prompt, SamplingParams(max_tokens=12, temperature=0.0), third)
        engine.submit(late)
        assert first.done.wait(120) and third.done.wait(120)
        assert max(e.batch_size for e in first.emissions) == 2
        assert "Paris" in second.text and "Paris" in third.text
        assert "sleep" in first.text.lower()
        assert long.token_ids[:8] == _generate(backend, sleep_prompt, 8)
    finally:
        engine.stop()
