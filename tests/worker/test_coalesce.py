"""Coalescing a stream's tokens into chunks (``services/worker/service/coalesce.py``).

The source here is an async generator shaped like Triton's stream (one chunk per
token, at a chosen pace); the worker's real path, with the embedded Triton, runs
in the worker's and the stack's tests with the default settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.worker.service.coalesce import chunks
from services.worker.service.slots import Execution
from services.worker.service.triton_client import Chunk, TritonRequestError


def token(i: int, reason: str = "") -> Chunk:
    return Chunk(f" t{i}", 1, i, 1, reason, bool(reason))


async def source(
    n: int, gap_s: float, *, pause_after: int = -1, pause_s: float = 0.0, fail_after: int = -1
) -> AsyncIterator[Chunk]:
    for i in range(1, n + 1):
        await asyncio.sleep(gap_s)
        if i - 1 == fail_after:
            raise TritonRequestError("Triton at x: backend failed")
        yield token(i, "length" if i == n else "")
        if i == pause_after:
            await asyncio.sleep(pause_s)


async def collect(
    stream: AsyncIterator[Chunk],
    execution: Execution,
    interval_s: float = 0.02,
    max_tokens: int = 16,
) -> list[tuple[float, Chunk]]:
    out = []
    async for chunk in chunks(stream, execution, interval_s, max_tokens):
        out.append((time.monotonic(), chunk))
    return out


def text_of(n: int) -> str:
    return "".join(f" t{i}" for i in range(1, n + 1))


async def test_fast_tokens_go_out_in_few_chunks_the_first_alone() -> None:
    execution = Execution("j", "replay")
    got = await collect(source(60, 0.002), execution)
    sent = [c for _, c in got]
    assert "".join(c.text for c in sent) == text_of(60) == execution.text
    assert sum(c.tokens for c in sent) == 60 == execution.tokens
    assert sent[0].tokens == 1  # time to first token unchanged
    assert all(c.tokens <= 16 for c in sent)
    assert len(sent) <= 12  # 60 tokens, one message each without coalescing
    assert sent[-1].finish_reason == "length"


async def test_slow_tokens_are_not_held_back() -> None:
    execution = Execution("j", "replay")
    started = time.monotonic()
    got = await collect(source(5, 0.05), execution)
    # Tokens 50 ms apart with a 20 ms interval: each goes out on its own, on time.
    assert [c.tokens for _, c in got] == [1, 1, 1, 1, 1]
    for i, (at, _) in enumerate(got, start=1):
        assert at - started < 0.05 * i + 0.04


async def test_waiting_tokens_go_out_at_the_interval_not_at_the_next_token() -> None:
    execution = Execution("j", "replay")
    started = time.monotonic()
    got = await collect(source(4, 0.001, pause_after=3, pause_s=0.4), execution)
    # Token 1 at once; tokens 2-3 within the 20 ms interval, not after the 0.4 s pause.
    assert [c.tokens for _, c in got][:2] == [1, 2]
    assert got[1][0] - started < 0.2


async def test_a_stop_ends_with_exactly_what_was_taken() -> None:
    execution = Execution("j", "replay")

    async def stop_later() -> None:
        await asyncio.sleep(0.03)
        execution.stop_reason = 5

    stopper = asyncio.create_task(stop_later())
    got = await collect(source(200, 0.002), execution)
    await stopper
    text = "".join(c.text for _, c in got)
    assert text == execution.text and 0 < execution.tokens < 200
    assert text == text_of(execution.tokens)


async def test_an_error_comes_after_the_text_before_it() -> None:
    execution = Execution("j", "replay")
    seen: list[Chunk] = []
    with pytest.raises(TritonRequestError, match="backend failed"):
        async for chunk in chunks(source(50, 0.002, fail_after=7), execution, 0.02, 16):
            seen.append(chunk)
    assert "".join(c.text for c in seen) == text_of(7) == execution.text


async def test_zero_interval_sends_every_chunk_as_it_comes() -> None:
    execution = Execution("j", "replay")
    got = await collect(source(10, 0.001), execution, interval_s=0.0)
    assert [c.tokens for _, c in got] == [1] * 10
    assert execution.text == text_of(10)


def test_bad_coalescing_settings_are_refused_naming_the_flag() -> None:
    from services.worker.config import WorkerConfig

    with pytest.raises(ValueError, match="--coalesce-ms"):
        WorkerConfig(coalesce_ms=-1.0)
    with pytest.raises(ValueError, match="--coalesce-tokens"):
        WorkerConfig(coalesce_tokens=0)
    assert WorkerConfig(coalesce_ms=0.0).coalesce_ms == 0.0  # off is allowed
