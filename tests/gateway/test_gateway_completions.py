"""The official ``openai`` client against the gateway on a live stack (replay model:
its text is known exactly), every response and chunk checked against the package's
own models (``conforms``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
from gateway_stack import conforms, gateway_stack
from live_stack import replay_text
from openai.types import Completion, Model

REPLAY = {"ignore_eos": True}


async def test_a_whole_completion_is_the_replay_text_with_usage_and_timings(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path) as gw:
        client = gw.client()
        raw = await client.completions.with_raw_response.create(
            model="replay", prompt="go", max_tokens=5, temperature=0, seed=7, extra_body=REPLAY
        )
        body = json.loads(raw.text)
        conforms(Completion, body)
        done = raw.parse()
        assert done.choices[0].text == replay_text(1, 5)
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 5
        # The replay model counts a prompt's words as its tokens: "go" is one.
        assert done.usage.prompt_tokens == 1
        assert done.usage.total_tokens == 6
        assert done.id.startswith("cmpl-") and done.model == "replay"
        assert raw.headers["x-request-id"] == done.id.removeprefix("cmpl-")
        assert float(raw.headers["x-shortline-queue-wait-ms"]) >= 0.0
        assert float(raw.headers["x-shortline-predicted-tokens"]) > 0.0
        assert raw.headers["x-shortline-worker"] == "w0"
        await client.close()


async def test_a_streamed_completion_ends_with_done_and_a_usage_chunk(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path) as gw:
        client = gw.client()
        stream = await client.completions.create(
            model="replay",
            prompt="go",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=REPLAY,
        )
        chunks = [chunk async for chunk in stream]
        for chunk in chunks:
            conforms(Completion, chunk.to_dict(mode="json"), chunk=True)
        texts = "".join(c.choices[0].text for c in chunks if c.choices)
        assert texts == replay_text(1, 8)
        *text_chunks, last, usage = chunks
        assert all(c.choices[0].finish_reason is None for c in text_chunks)
        assert all(c.usage is None for c in text_chunks)
        assert last.choices[0].finish_reason == "length" and last.choices[0].text == ""
        assert usage.choices == [] and usage.usage is not None
        assert usage.usage.completion_tokens == 8
        assert usage.usage.prompt_tokens == 1 and usage.usage.total_tokens == 9
        assert len({c.id for c in chunks}) == 1
        await client.close()

        # On the wire: SSE "data:" lines ending with [DONE]; no usage chunk unless asked.
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                f"{gw.url}/v1/completions",
                json={"model": "replay", "prompt": "go", "max_tokens": 3, "stream": True, **REPLAY},
            ) as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines() if line]
        assert all(line.startswith("data: ") for line in lines)
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert all("usage" not in e for e in events)
        assert "".join(e["choices"][0]["text"] for e in events) == replay_text(1, 3)


async def test_models_come_from_the_scheduler(embedded_triton: Any, tmp_path: Path) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path) as gw:
        async with httpx.AsyncClient() as http:
            listed = (await http.get(f"{gw.url}/v1/models")).json()
            assert (await http.get(f"{gw.url}/health")).status_code == 200
            assert (await http.get(f"{gw.url}/ready")).status_code == 200
        assert listed["object"] == "list" and set(listed) == {"object", "data"}
        for item in listed["data"]:
            conforms(Model, item)
        assert gw.stack is not None
        served = {m.model for m in gw.stack.scheduler.plane.workers.served()}
        client = gw.client()
        ids = {m.id async for m in client.models.list()}
        assert ids == served and "replay" in ids
        await client.close()


async def test_concurrent_streams_each_get_their_own_text(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path, slots=4) as gw:
        client = gw.client()

        async def one(n: int) -> str:
            stream = await client.completions.create(
                model="replay", prompt=f"p{n}", max_tokens=n, stream=True, extra_body=REPLAY
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])

        lengths = [3, 9, 14, 20, 6, 11]
        texts = await asyncio.gather(*(one(n) for n in lengths))
        assert texts == [replay_text(1, n) for n in lengths]
        await client.close()


async def test_a_client_chosen_request_id_makes_a_retry_idempotent(
    embedded_triton: Any, tmp_path: Path
) -> None:
    """The same X-Request-Id and body get the first request's answer (the scheduler's
    result store), not a second run; another body under that id is a 409."""
    async with gateway_stack(embedded_triton.grpc_url, tmp_path) as gw, httpx.AsyncClient() as http:
        body = {"model": "replay", "prompt": "go", "max_tokens": 6, **REPLAY}
        headers = {"x-request-id": "order-42.retry_1"}
        first = await http.post(f"{gw.url}/v1/completions", json=body, headers=headers)
        again = await http.post(f"{gw.url}/v1/completions", json=body, headers=headers)
        assert first.status_code == again.status_code == 200
        assert first.headers["x-request-id"] == "order-42.retry_1"
        one, two = first.json(), again.json()
        conforms(Completion, two)
        assert one["id"] == two["id"] == "cmpl-order-42.retry_1"
        assert one["choices"] == two["choices"] and one["usage"] == two["usage"]
        assert gw.stack is not None
        assert gw.stack.scheduler.plane.core.completed == 1  # it ran once
        async with http.stream(
            "POST", f"{gw.url}/v1/completions", json={**body, "stream": True}, headers=headers
        ) as streamed:
            lines = [line async for line in streamed.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert "".join(e["choices"][0]["text"] for e in events) == replay_text(1, 6)
        assert gw.stack.scheduler.plane.core.completed == 1

        other = await http.post(
            f"{gw.url}/v1/completions", json={**body, "max_tokens": 7}, headers=headers
        )
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "conflict"

        bad_ids: list[str | bytes] = ["", "a b", "x" * 129, "naïve".encode()]
        for bad in bad_ids:
            refused = await http.post(
                f"{gw.url}/v1/completions", json=body, headers={"x-request-id": bad}
            )
            assert refused.status_code == 400, bad
            assert refused.json()["error"]["param"] == "X-Request-Id"
