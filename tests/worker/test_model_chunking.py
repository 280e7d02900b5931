"""Chunks made by the embedded models themselves (services/worker/triton/chunking.py):
the rule, and a real Triton sending fewer responses with the same text."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.worker.service.triton_client import TritonClient
from services.worker.triton.chunking import Chunker


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_first_token_goes_at_once_then_by_interval_or_count_and_the_rest_at_the_end() -> None:
    clock = _Clock()
    chunker = Chunker(interval_s=0.1, max_tokens=3, clock=clock)
    assert chunker.add(" a", 1, False) == (" a", 1)  # the first at once
    clock.now = 0.01
    assert chunker.add(" b", 1, False) is None
    clock.now = 0.02
    assert chunker.add(" c", 1, False) is None
    clock.now = 0.03
    assert chunker.add(" d", 1, False) == (" b c d", 3)  # three waiting
    clock.now = 0.05
    assert chunker.add(" e", 1, False) is None
    clock.now = 0.14
    assert chunker.add(" f", 1, False) == (" e f", 2)  # the interval since the last send
    clock.now = 0.15
    assert chunker.add(" g", 1, True) == (" g", 1)  # the end takes what is left


def test_a_slow_stream_or_no_interval_goes_token_by_token() -> None:
    clock = _Clock()
    slow = Chunker(interval_s=0.1, max_tokens=16, clock=clock)
    for i in range(4):
        clock.now = i * 0.2
        assert slow.add(f" t{i}", 1, False) == (f" t{i}", 1)
    off = Chunker(interval_s=0.0, max_tokens=16, clock=clock)
    assert [off.add(" x", 1, False) for _ in range(3)] == [(" x", 1)] * 3


async def _read(client: TritonClient, tokens: int, chunk_ms: float) -> tuple[str, int, int]:
    stream = await client.stream(
        "replay",
        "go",
        {"max_tokens": tokens, "ignore_eos": True},
        request_id=f"chunk-{chunk_ms}",
        chunk_ms=chunk_ms,
        chunk_tokens=8,
    )
    text, counted, responses = "", 0, 0
    async for chunk in stream:
        text += chunk.text
        counted += chunk.tokens
        responses += 1
    return text, counted, responses


@pytest.mark.asyncio
async def test_a_model_asked_for_chunks_sends_fewer_responses_with_the_same_text(
    embedded_triton: Any,
) -> None:
    client = TritonClient(embedded_triton.grpc_url)
    try:
        per_token, chunked = await asyncio.gather(_read(client, 60, 0.0), _read(client, 60, 200.0))
    finally:
        await client.close()
    expected = "".join(f" replay{i}" for i in range(1, 61))
    assert per_token == (expected, 60, 60)
    text, counted, responses = chunked
    assert (text, counted) == (expected, 60)
    # The first token alone, then at most 8 per chunk: 1 + ceil(59 / 8) = 9 at least.
    assert 9 <= responses <= 20, responses
