"""Open-loop load against a live scheduler: each request leaves at its arrival time.

Open loop (requests do not wait for earlier answers) is what a service sees
from many independent users, and the only way a queue, and so a scheduling
policy, matters. Times are taken on the client: completion time runs from
the request's scheduled arrival to the end of its stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
from dataclasses import dataclass, field

import grpc
import numpy as np
from numpy.typing import NDArray

from shortline.benchmark.summary import RequestTimes
from shortline.benchmark.workload import BenchWorkload
from shortline.client import AsyncShortlineClient, ClientOptions
from shortline.client.types import Result

REPLAY_MODEL = "replay"
_TOKEN = " replay"


@dataclass
class LiveCell:
    """Client-side record of one cell, plus what the scheduler reported per request."""

    times: RequestTimes
    tokens_seen: NDArray[np.int64]  # replay tokens counted in the streamed text
    actual_tokens: NDArray[np.int64]  # GenerateResult.actual_tokens
    predicted: NDArray[np.float64]  # GenerateResult.predicted_tokens
    sources: list[str]
    send_lag_s: NDArray[np.float64]  # how late each request left (client overload shows here)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass(frozen=True)
class StepTimes:
    """The replay decode step ``a + b * batch`` as the live stack really runs it."""

    a_s: float
    b_s: float
    one_s: float  # per-token time of a lone request
    full_s: float  # per-token time with ``batch`` concurrent requests
    batch: int


async def _stream_one(
    client: AsyncShortlineClient,
    prompt: str,
    tokens: int,
    length_model: str,
    request_id: str,
    t0: float,
    loop: asyncio.AbstractEventLoop,
) -> tuple[float, float, int, object]:
    """(first token time, end time, replay tokens seen, result), times relative to ``t0``."""
    stream = client.generate(
        prompt,
        model=REPLAY_MODEL,
        max_tokens=tokens,
        ignore_eos=True,
        length_model=length_model,
        request_id=request_id,
    )
    first = math.nan
    seen = 0
    async for text in stream:
        if math.isnan(first):
            first = loop.time() - t0
        seen += text.count(_TOKEN)
    return first, loop.time() - t0, seen, stream.result


async def run_cell(
    server: ClientOptions,
    work: BenchWorkload,
    *,
    length_model: str,
    cell_id: str,
    progress_desc: str | None = None,
) -> LiveCell:
    """Sends every request of ``work`` at its arrival time and waits for all answers."""
    n = len(work)
    first = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    wait = np.full(n, np.nan)
    lag = np.zeros(n)
    seen = np.zeros(n, dtype=np.int64)
    actual = np.zeros(n, dtype=np.int64)
    predicted = np.full(n, np.nan)
    preempt = np.zeros(n, dtype=np.int64)
    sources = [""] * n
    errors: list[str] = []
    bar = None
    if progress_desc is not None:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=progress_desc, unit="req", leave=False)
    loop = asyncio.get_running_loop()
    async with AsyncShortlineClient(dataclasses.replace(server, retries=3)) as client:
        t0 = loop.time() + 0.2
        arrivals = work.arrivals

        async def one(i: int) -> None:
            delay = t0 + float(arrivals[i]) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag[i] = max(0.0, loop.time() - t0 - float(arrivals[i]))
            try:
                f, end, k, res = await _stream_one(
                    client,
                    work.prompts[i],
                    int(work.true_tokens[i]),
                    length_model,
                    f"{cell_id}-{i}",
                    t0,
                    loop,
                )
            except grpc.aio.AioRpcError as exc:
                errors.append(f"request {i}: {exc.code().name}: {exc.details()}")
            else:
                first[i] = f
                finish[i] = end
                seen[i] = k
                if res is not None:
                    assert isinstance(res, Result)
                    wait[i] = res.queue_wait_seconds
                    actual[i] = res.actual_tokens
                    predicted[i] = res.predicted_tokens
                    preempt[i] = res.preemptions
                    sources[i] = res.prediction_source
            if bar is not None:
                bar.update(1)

        started = loop.time()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = loop.time() - started
    if bar is not None:
        bar.close()
    times = RequestTimes(
        arrival=np.asarray(work.arrivals, dtype=np.float64),
        first_token=first,
        finish=finish,
        tokens=work.true_tokens.astype(np.int64),
        wait=wait,
        preemptions=preempt,
    )
    return LiveCell(times, seen, actual, predicted, sources, lag, errors, wall)


async def wait_for_workers(server: ClientOptions, workers: int, timeout_s: float = 60.0) -> None:
    """Until the scheduler knows ``workers`` live workers (they re-register after a restart)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with AsyncShortlineClient(dataclasses.replace(server, timeout_seconds=5)) as client:
        while True:
            try:
                stats = await client.stats()
                if sum(1 for w in stats.workers if w.alive) >= workers:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(
                    f"{workers} workers did not register with {server.target} in time"
                )
            await asyncio.sleep(0.2)


async def guard_stats(server: ClientOptions) -> tuple[int, float]:
    """ssjf-aging's guard after a cell: (jobs that reached their latest start, token time s)."""
    async with AsyncShortlineClient(dataclasses.replace(server, timeout_seconds=5)) as client:
        stats = await client.stats()
    return int(stats.late_jobs), float(stats.token_time_seconds)


async def measure_step_times(
    server: ClientOptions, *, length_model: str, batch: int, tokens: int = 120, repeats: int = 2
) -> StepTimes:
    """Per-token time alone and with ``batch`` concurrent requests; fits ``a + b * batch``.

    Needs a scheduler in continuous batching with at least ``batch`` slots on one
    worker. The time between a stream's first and last token, over its tokens
    minus one, is the step the client really sees, pipeline included.
    """
    loop = asyncio.get_running_loop()
    async with AsyncShortlineClient(server) as client:

        async def per_token(tag: str) -> float:
            t0 = loop.time()
            f, end, k, _ = await _stream_one(
                client, "calibration", tokens, length_model, tag, t0, loop
            )
            if k != tokens:
                raise RuntimeError(f"calibration stream gave {k} replay tokens, expected {tokens}")
            return (end - f) / (tokens - 1)

        ones: list[float] = []
        fulls: list[float] = []
        for r in range(repeats):
            ones.append(await per_token(f"calib-one-{r}-{id(ones)}"))
            got = await asyncio.gather(
                *(per_token(f"calib-full-{r}-{j}-{id(fulls)}") for j in range(batch))
            )
            fulls.append(statistics.median(got))
    one = statistics.median(ones)
    full = statistics.median(fulls)
    b = max(0.0, (full - one) / (batch - 1)) if batch > 1 else 0.0
    return StepTimes(a_s=max(1e-4, one - b), b_s=b, one_s=one, full_s=full, batch=batch)
