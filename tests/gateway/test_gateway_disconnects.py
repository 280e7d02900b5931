"""A client that leaves frees its scheduler slot (or queue place) at once: mid-stream,
while still queued before any text, and while waiting for a whole completion."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from gateway_stack import gateway_stack
from live_stack import replay_request, wait_for

from shortline.scheduler.v1 import scheduler_pb2

REPLAY = {"ignore_eos": True}
LONG = 2000  # about 20 s of replay steps: only a cancellation ends it in time


async def test_closing_a_stream_frees_the_slot(embedded_triton: Any, tmp_path: Path) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path, slots=1) as gw:
        assert gw.stack is not None
        core = gw.stack.scheduler.plane.core
        client = gw.client()
        stream = await client.completions.create(
            model="replay", prompt="go", max_tokens=LONG, stream=True, extra_body=REPLAY
        )
        seen = 0
        async for _chunk in stream:
            seen += 1
            if seen == 3:
                break
        assert core.running == 1
        closed = time.monotonic()
        await stream.close()
        await wait_for(lambda: core.running == 0, timeout=5)
        assert time.monotonic() - closed < 2.0
        stats = await gw.stack.stub.GetStats(scheduler_pb2.GetStatsRequest())
        assert stats.cancelled == 1 and stats.completed == 0
        await client.close()


async def test_leaving_while_queued_or_waiting_frees_the_request(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path, slots=1) as gw:
        assert gw.stack is not None
        core = gw.stack.scheduler.plane.core
        blocker = gw.stack.stub.Generate(replay_request("blocker", LONG), timeout=60)
        try:
            await blocker.read()
            await wait_for(lambda: core.running == 1)
            client = gw.client()
            for stream in (True, False):
                # Queued behind the blocker: no header, no text yet; the client gives up.
                request = asyncio.create_task(
                    client.completions.create(
                        model="replay", prompt="go", max_tokens=4, stream=stream, extra_body=REPLAY
                    )
                )
                await wait_for(lambda: core.queue_depth == 1)
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
                await wait_for(lambda: core.queue_depth == 0, timeout=5)
                assert core.running == 1  # the blocker still runs
            await client.close()
        finally:
            blocker.cancel()
