"""Chat requests through a real scheduler and worker on the embedded Triton: the SDK's
``generate(messages=...)`` gets the exact replay text; a model whose worker has no chat
template is refused before Accepted, naming it; a chat request queued before any worker
joined is never run on a worker that cannot format it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from chat_stack import RAW_SETTINGS, add_worker, chat_stack
from live_stack import replay_text, stack

from shortline.client import AsyncShortlineClient, ClientOptions
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go."}]


@pytest.mark.asyncio
async def test_the_sdk_sends_messages_and_gets_the_exact_text(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with chat_stack(embedded_triton.grpc_url, tmp_path) as s:
        client = AsyncShortlineClient(ClientOptions(target=s.scheduler.address, retries=0))
        stream = client.generate(messages=MESSAGES, model="replay", max_tokens=6, ignore_eos=True)
        assert await stream.collect() == replay_text(1, 6)
        assert stream.result is not None and stream.result.actual_tokens == 6
        listed = await s.stub.ListModels(scheduler_pb2.ListModelsRequest())
        assert {m.model: m.chat for m in listed.models}["replay"] is True
        with pytest.raises(ValueError, match="exactly one of prompt and messages"):
            client.generate("hi", messages=MESSAGES, model="replay")
        await client.close()


@pytest.mark.asyncio
async def test_a_raw_model_refuses_chat_before_accepted_naming_it(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:  # replay served raw
        call = s.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="c1",
                model="replay",
                messages=[common_pb2.ChatMessage(role="user", content="Go.")],
                max_tokens=4,
            ),
            timeout=30,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages are not supported by model 'replay'" in (info.value.details() or "")


@pytest.mark.asyncio
async def test_a_queued_chat_request_never_runs_on_a_worker_that_cannot_format_it(
    embedded_triton: Any, tmp_path: Path
) -> None:
    # Before any worker joins a chat request may queue (the outer bounds); the worker
    # that then joins serves replay raw (as one predating chat would ignore messages).
    async with stack(embedded_triton.grpc_url, tmp_path, workers=0) as s:
        call = s.stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="c1",
                model="replay",
                messages=[common_pb2.ChatMessage(role="user", content="Go.")],
                max_tokens=4,
                sampling=common_pb2.SamplingParams(ignore_eos=True),
            ),
            timeout=30,
        )
        first = await call.read()
        assert isinstance(first, scheduler_pb2.GenerateResponse) and first.HasField("accepted")
        await add_worker(s, embedded_triton.grpc_url, "old", RAW_SETTINGS)
        deltas = []

        async def rest() -> None:
            while isinstance(msg := await call.read(), scheduler_pb2.GenerateResponse):
                deltas.append(msg)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(rest(), 20)
        assert deltas == []  # nothing ran
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "worker old does not format chat messages for model 'replay'" in (
            info.value.details() or ""
        )
