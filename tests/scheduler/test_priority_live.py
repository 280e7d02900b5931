"""Priority through the real gRPC scheduler with a real worker on the embedded Triton:
a high-priority request overtakes queued low ones, and a tenant's max_priority is
enforced (PERMISSION_DENIED naming the field and the cap)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import stack, wait_for

pytestmark = pytest.mark.slow


async def test_a_high_priority_request_overtakes_queued_low_ones(
    embedded_triton: Any, tmp_path: Path
) -> None:
    # fcfs: without bands the order would be arrival order.
    async with stack(embedded_triton.grpc_url, tmp_path, policy="fcfs") as s:
        finished: list[str] = []

        async def run(rid: str, n: int, **kw: Any) -> None:
            await s.generate(rid, n, **kw)
            finished.append(rid)

        busy = asyncio.create_task(run("busy", 60))
        await wait_for(lambda: s.scheduler.plane.core.running == 1)
        lows = [asyncio.create_task(run(f"low{i}", 10)) for i in range(3)]
        await wait_for(lambda: len(s.scheduler.plane.core.queue) == 3)
        high = asyncio.create_task(run("high", 10, priority=5))
        await asyncio.gather(busy, high, *lows)
        # (The three low requests race each other to admission: their order is theirs.)
        assert finished[:2] == ["busy", "high"]
        assert sorted(finished[2:]) == ["low0", "low1", "low2"]


async def test_a_priority_above_the_tenants_cap_is_refused(
    embedded_triton: Any, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[[token]]\ntenant = "plain"\ntoken = "tok-plain"\n'
        '[[token]]\ntenant = "gold"\ntoken = "tok-gold"\nmax_priority = 3\n'
    )
    tokens.chmod(0o600)
    async with stack(embedded_triton.grpc_url, tmp_path, tokens_file=str(tokens)) as s:
        gold = (("authorization", "Bearer tok-gold"),)
        plain = (("authorization", "Bearer tok-plain"),)
        msgs, _ = await s.generate("g", 3, metadata=gold, priority=3)
        assert msgs[-1].HasField("result")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.generate("p", 3, metadata=plain, priority=2**31 - 1)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "max_priority 0" in (err.value.details() or "")
