"""``/v1/chat/completions`` with the official ``openai`` client on a live stack whose
worker formats chat for ``replay`` (its text is known exactly) and for SmolLM2, every
response and chunk checked strictly against the package's own chat models."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from chat_stack import chat_stack
from gateway_stack import conforms, serve_gateway
from live_stack import replay_text, stack
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from services.gateway.config import GatewayConfig
from services.worker.prompts import format_messages

REPLAY = {"ignore_eos": True}
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": "The Nile."},
    {"role": "user", "content": [{"type": "text", "text": "Another?"}]},
]


@contextlib.asynccontextmanager
async def chat_gateway(triton_url: str, tmp_path: Path) -> AsyncIterator[str]:
    async with chat_stack(triton_url, tmp_path) as s:
        cfg = GatewayConfig(scheduler=s.scheduler.address, retries=0)
        async with serve_gateway(cfg) as url:
            yield url


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


async def test_a_whole_chat_completion(embedded_triton: Any, tmp_path: Path) -> None:
    async with chat_gateway(embedded_triton.grpc_url, tmp_path) as url:
        client = _client(url)
        raw = await client.chat.completions.with_raw_response.create(
            model="replay",
            messages=MESSAGES,
            max_completion_tokens=5,
            temperature=0,
            seed=3,
            extra_body=REPLAY,
        )
        body = json.loads(raw.text)
        conforms(ChatCompletion, body)
        done = raw.parse()
        assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
        (choice,) = done.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == replay_text(1, 5)
        assert choice.finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 5
        # The conversation as the worker formatted it (chatml), counted in words by the
        # replay model: the count comes from what Triton was given, not from the gateway.
        turns = [("system", "Be brief."), ("user", "Name a river."), ("assistant", "The Nile.")]
        formatted = format_messages("chatml", [*turns, ("user", "Another?")])
        assert done.usage.prompt_tokens == len(formatted.split()) > 8
        assert raw.headers["x-request-id"] == done.id.removeprefix("chatcmpl-")
        await client.close()


async def test_a_streamed_chat_completion_sends_the_role_first(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with chat_gateway(embedded_triton.grpc_url, tmp_path) as url:
        client = _client(url)
        stream = await client.chat.completions.create(
            model="replay",
            messages=MESSAGES,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=REPLAY,
        )
        chunks = [chunk async for chunk in stream]
        for chunk in chunks:
            conforms(ChatCompletionChunk, chunk.to_dict(mode="json"))
        role, *texts, last, usage = chunks
        assert role.choices[0].delta.role == "assistant"
        assert role.choices[0].delta.content == ""
        assert all(c.choices[0].delta.role is None for c in texts)
        assert "".join(c.choices[0].delta.content or "" for c in texts) == replay_text(1, 8)
        assert all(c.choices[0].finish_reason is None and c.usage is None for c in texts)
        assert last.choices[0].finish_reason == "length"
        assert last.choices[0].delta.content is None
        assert usage.choices == [] and usage.usage is not None
        assert usage.usage.completion_tokens == 8
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert len({c.id for c in chunks}) == 1
        await client.close()


async def test_smollm2_chat_of_one_user_message_is_its_completion(
    embedded_triton: Any, tmp_path: Path
) -> None:
    """A single user message and a prompt reach Triton as the same formatted text, so
    greedy decoding gives the same answer: the worker applied SmolLM2's template."""
    async with chat_gateway(embedded_triton.grpc_url, tmp_path) as url:
        client = _client(url)
        model = "smollm2-135m-instruct"
        chat = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name a river."}],
            max_tokens=6,
            temperature=0,
        )
        plain = await client.completions.create(
            model=model, prompt="Name a river.", max_tokens=6, temperature=0
        )
        assert chat.choices[0].message.content
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.usage is not None and plain.usage is not None
        assert chat.usage.completion_tokens == plain.usage.completion_tokens
        # The same formatted text, counted by SmolLM2's tokenizer: the default system
        # message alone is more than ten tokens.
        assert chat.usage.prompt_tokens == plain.usage.prompt_tokens > 10
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
        await client.close()


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'tool'"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0].name", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "", "text"),
    ({"tools": [{"type": "function"}]}, "tools", "no tools"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "differ"),
    ({"prompt": "go"}, "prompt", "not supported"),
    # The scheduler's own limit, named through its INVALID_ARGUMENT.
    ({"messages": [{"role": "user", "content": "x"}] * 300}, "messages", "max_messages"),
]


async def test_bad_chat_requests_are_400_naming_the_parameter(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with chat_gateway(embedded_triton.grpc_url, tmp_path) as url, httpx.AsyncClient() as http:
        for extra, param, words in BAD:
            body = {"model": "replay", "messages": MESSAGES, "max_tokens": 3, **extra}
            response = await http.post(f"{url}/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == (param or "messages[0].content[0]"), extra
            assert words in error["message"], extra


async def test_a_model_without_a_chat_template_is_400_naming_it(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with stack(embedded_triton.grpc_url, tmp_path) as s:  # replay served raw
        cfg = GatewayConfig(scheduler=s.scheduler.address, retries=0)
        async with serve_gateway(cfg) as url:
            client = _client(url)
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model="replay", messages=MESSAGES, max_tokens=3
                )
            assert "model 'replay'" in str(info.value)
            assert info.value.body is not None
            assert info.value.body["param"] == "messages"  # type: ignore[index]
            await client.close()
