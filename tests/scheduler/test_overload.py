"""Admission that protects the service, over real gRPC with a real worker on the
embedded Triton: a full queue answers RESOURCE_EXHAUSTED at once with a retry hint
(and nothing refuses before it: one connection may carry more streams than the
queue holds), a tenant over its share is refused while another is admitted, and a
deadline that cannot be met is refused before Accepted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import Stack, replay_request, stack, wait_for

from services.scheduler.service.servicer import RETRY_PUSHBACK_KEY

pytestmark = pytest.mark.slow

LONG = 3000  # tokens: runs far longer than any test here
A_TOKEN = "token-of-team-a-overload-0123"
B_TOKEN = "token-of-team-b-overload-4567"


def request(request_id: str, max_tokens: int = LONG, **fields: Any) -> Any:
    return replay_request(request_id, max_tokens, **fields)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def first_message(
    s: Stack, request_id: str, metadata: Any = None, timeout: float | None = 120
) -> tuple[Any, Any]:
    """Opens a stream and reads its first message (Accepted, or the refusal raises)."""
    call = s.stub.Generate(request(request_id), metadata=metadata, timeout=timeout)
    return call, await call.read()


async def refusal(
    s: Stack, request_id: str, metadata: Any = None, timeout: float | None = 120
) -> tuple[grpc.aio.AioRpcError, float]:
    """The status a request is refused with, and how long the refusal took."""
    t0 = time.monotonic()
    call = s.stub.Generate(request(request_id), metadata=metadata, timeout=timeout)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for msg in call:
            assert not msg.HasField("accepted"), "refused requests are never accepted"
    return err.value, time.monotonic() - t0


def pushback_ms(err: grpc.aio.AioRpcError) -> int:
    trailing: Any = err.trailing_metadata() or ()
    values = [v for k, v in trailing if k == RETRY_PUSHBACK_KEY]
    assert len(values) == 1, err.trailing_metadata()
    return int(values[0])


async def test_a_full_queue_refuses_at_once_with_a_retry_hint_and_streams_do_not_refuse_first(
    embedded_triton: Any, tmp_path: Path
) -> None:
    # More waiting requests than the 1000 HTTP/2 streams a connection used to be allowed,
    # all on the one channel of the stack's stub.
    limit = 1100
    async with stack(embedded_triton.grpc_url, tmp_path, slots=1, queue_limit=limit) as s:
        core = s.scheduler.plane.core
        calls = [s.stub.Generate(request(f"q{i}"), timeout=120) for i in range(limit + 1)]
        try:
            reads = asyncio.gather(*(call.read() for call in calls))
            firsts: list[Any] = await asyncio.wait_for(reads, 30)
            assert all(m.HasField("accepted") for m in firsts)
            await wait_for(lambda: core.running == 1 and core.queue_depth == limit)
            err, took = await refusal(s, "one-too-many")
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert took < 0.5
            details = err.details() or ""
            assert f"queue is full: {limit} requests waiting, limit {limit}" in details
            assert "retry in about" in details
            assert pushback_ms(err) > 0
            assert core.stats().submitted == limit + 1  # the refused one was never queued
        finally:
            for call in calls:
                call.cancel()
        await wait_for(lambda: core.queue_depth == 0 and core.running == 0)


async def test_a_tenant_over_its_share_is_refused_while_another_is_admitted(
    embedded_triton: Any, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\ntenant = "team-a"\ntoken = "{A_TOKEN}"\n\n'
        f'[[token]]\ntenant = "team-b"\ntoken = "{B_TOKEN}"\n'
    )
    a, b = bearer(A_TOKEN), bearer(B_TOKEN)
    async with stack(
        embedded_triton.grpc_url,
        tmp_path,
        slots=1,
        queue_limit=4,
        tenant_queue_share=0.5,  # 2 waiting places per tenant
        tokens_file=str(tokens),
    ) as s:
        core = s.scheduler.plane.core
        calls = []
        try:
            for i in range(3):  # one runs, two wait
                call, msg = await first_message(s, f"a{i}", a)
                assert msg.HasField("accepted")
                calls.append(call)
            await wait_for(lambda: core.running == 1 and core.queue_depth == 2)
            err, took = await refusal(s, "a3", a)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert took < 0.5
            details = err.details() or ""
            assert "tenant 'team-a' already has 2 requests waiting" in details
            assert "tenant_queue_share" in details and "retry in about" in details
            assert pushback_ms(err) > 0
            # The queue has room, and team-b has its own share of it.
            call, msg = await first_message(s, "b0", b)
            assert msg.HasField("accepted")
            calls.append(call)
            # One of team-a's waiting requests goes: team-a may queue one more.
            calls[1].cancel()
            await wait_for(lambda: core.queue_depth == 2)
            call, msg = await first_message(s, "a4", a)
            assert msg.HasField("accepted")
            calls.append(call)
        finally:
            for call in calls:
                call.cancel()


async def test_a_deadline_that_cannot_be_met_is_refused_before_accepted(
    embedded_triton: Any, tmp_path: Path
) -> None:
    # The default policy (ssjf-aging) with its seconds per token configured, and every
    # request predicted at its real length (the fallback, there being no predictor).
    async with stack(
        embedded_triton.grpc_url, tmp_path, slots=1, token_time_s=0.011, fallback_tokens=LONG
    ) as s:
        plane = s.scheduler.plane
        assert plane.admission.seconds_per_token() == 0.011
        running, msg = await first_message(s, "long")  # ~33 s ahead of anything
        assert msg.HasField("accepted")
        try:
            await wait_for(lambda: plane.core.running == 1)
            err, took = await refusal(s, "hopeless", timeout=3.0)
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert took < 1.0  # at admission, not when the 3 s are over
            details = err.details() or ""
            assert "deadline cannot be met" in details and "s left" in details
            # It holds no place, and no record is kept: a retry may pass once the
            # queue is shorter.
            assert plane.core.get("hopeless") is None
            assert plane.lookup("hopeless") is None
            # A deadline the queue allows is admitted.
            patient, msg = await first_message(s, "patient", timeout=600.0)
            assert msg.HasField("accepted")
            patient.cancel()
        finally:
            running.cancel()
