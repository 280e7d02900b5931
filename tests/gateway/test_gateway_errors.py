"""Every error the gateway answers, provoked for real and read by the official client:
OpenAI's error body (``{"error": {message, type, param, code}}``) and the HTTP status
the client branches on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import openai
import pytest
from gateway_stack import gateway_stack, serve_gateway
from live_stack import replay_request, wait_for

from services.gateway.config import GatewayConfig
from shortline.common.net import free_port

REPLAY = {"ignore_eos": True}
TOKEN = "gateway-test-token-a"
LIMITED = "gateway-test-token-limited"
HINTED = "gateway-test-token-hinted"


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


async def test_bad_requests_are_400_naming_the_parameter_and_unknown_models_404(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path) as gw:
        client = gw.client()
        create = client.completions.create
        cases: list[tuple[dict[str, Any], str]] = [
            ({"n": 2}, "n"),
            ({"logprobs": 1}, "logprobs"),
            ({"echo": True}, "echo"),
            ({"best_of": 3}, "best_of"),
            ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
            ({"extra_body": {"prompt": ["a", "b"]}}, "prompt"),
            ({"stream_options": {"include_usage": True}}, "stream_options"),
            ({"temperature": -1.0}, "temperature"),  # the scheduler's own check
            ({"max_tokens": 10**6}, "max_tokens"),  # the scheduler's own check
        ]
        for kwargs, param in cases:
            args: dict[str, Any] = {"model": "replay", "prompt": "go", "max_tokens": 2, **kwargs}
            with pytest.raises(openai.BadRequestError) as caught:
                await create(**args)
            assert caught.value.status_code == 400
            assert _error(caught.value)["param"] == param, kwargs

        with pytest.raises(openai.NotFoundError) as missing:
            await create(model="no-such-model", prompt="go", max_tokens=2)
        error = _error(missing.value)
        assert error["param"] == "model" and "no-such-model" in error["message"]

        # The same refusals for a stream: the status comes before any event.
        with pytest.raises(openai.NotFoundError):
            await create(model="no-such-model", prompt="go", max_tokens=2, stream=True)

        # This stack serves replay raw (no chat template): chat is refused naming it.
        with pytest.raises(openai.BadRequestError) as chat:
            await client.chat.completions.create(
                model="replay", messages=[{"role": "user", "content": "hi"}]
            )
        assert _error(chat.value)["param"] == "messages"
        assert "model 'replay'" in _error(chat.value)["message"]
        await client.close()

        async with httpx.AsyncClient() as http:
            big = await http.post(
                f"{gw.url}/v1/completions",
                content=b'{"prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}',
                headers={"content-type": "application/json"},
            )
            assert big.status_code == 413
            broken = await http.post(f"{gw.url}/v1/completions", content=b"{not json")
            assert broken.status_code == 400 and "error" in broken.json()


async def test_a_deadline_that_passes_is_504(embedded_triton: Any, tmp_path: Path) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path) as gw:
        client = gw.client()
        with pytest.raises(openai.APIStatusError) as late:
            await client.completions.create(
                model="replay",
                prompt="go",
                max_tokens=400,  # about 4 s of replay steps
                extra_body={**REPLAY, "deadline_seconds": 0.3},
            )
        assert late.value.status_code == 504
        await client.close()


async def test_tokens_pass_through_401_and_403(embedded_triton: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\ntenant = "a"\ntoken = "{TOKEN}"\n\n'
        f'[[token]]\ntenant = "limited"\ntoken = "{LIMITED}"\nmodels = ["smollm2-135m-instruct"]\n'
        f'[[token]]\ntenant = "hinted"\ntoken = "{HINTED}"\nlength_hints = true\n'
    )
    async with gateway_stack(embedded_triton.grpc_url, tmp_path, tokens_file=str(tokens)) as gw:
        good = gw.client(api_key=TOKEN)
        done = await good.completions.create(
            model="replay", prompt="go", max_tokens=2, extra_body=REPLAY
        )
        assert done.choices[0].finish_reason == "length"
        bad = gw.client(api_key="not-a-token")
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.completions.create(model="replay", prompt="go", max_tokens=2)
        assert "not-a-token" not in refused.value.response.text
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        limited = gw.client(api_key=LIMITED)
        with pytest.raises(openai.PermissionDeniedError):
            await limited.completions.create(model="replay", prompt="go", max_tokens=2)
        assert "replay" not in {m.id async for m in limited.models.list()}
        assert "replay" in {m.id async for m in good.models.list()}
        # A length hint orders the queue: only a tenant granted length_hints may send it.
        with pytest.raises(openai.PermissionDeniedError) as no_hint:
            await good.completions.create(
                model="replay", prompt="go", max_tokens=2, extra_body={"length_hint": 1}
            )
        assert _error(no_hint.value)["param"] == "length_hint"
        hinted = gw.client(api_key=HINTED)
        raw = await hinted.completions.with_raw_response.create(
            model="replay", prompt="go", max_tokens=4, extra_body={**REPLAY, "length_hint": 3}
        )
        assert raw.headers["x-shortline-prediction-source"] == "hint"
        assert float(raw.headers["x-shortline-predicted-tokens"]) == 3.0
        assert raw.parse().usage.completion_tokens == 4  # a hint orders; it does not cut
        await hinted.close()
        async with httpx.AsyncClient() as http:
            anonymous = await http.get(f"{gw.url}/v1/models")
            assert anonymous.status_code == 401
            malformed = await http.get(
                f"{gw.url}/v1/models", headers={"authorization": "Basic abc"}
            )
            assert malformed.status_code == 401
        for c in (good, bad, limited):
            await c.close()


async def test_a_full_queue_is_429_with_retry_after(embedded_triton: Any, tmp_path: Path) -> None:
    async with gateway_stack(embedded_triton.grpc_url, tmp_path, slots=1, queue_limit=1) as gw:
        assert gw.stack is not None
        core = gw.stack.scheduler.plane.core
        calls = []
        try:
            for i in range(2):  # one runs, one waits: the queue is full
                calls.append(gw.stack.stub.Generate(replay_request(f"fill{i}", 2000), timeout=60))
                await calls[-1].read()
                await wait_for(lambda: core.running == 1)
            await wait_for(lambda: core.queue_depth == 1)
            client = gw.client()
            with pytest.raises(openai.RateLimitError) as full:
                await client.completions.create(model="replay", prompt="go", max_tokens=2)
            assert int(full.value.response.headers["retry-after"]) >= 1
            assert _error(full.value)["code"] == "rate_limit_exceeded"
            await client.close()
        finally:
            for call in calls:
                call.cancel()


async def test_an_unreachable_scheduler_is_503_and_not_ready() -> None:
    cfg = GatewayConfig(scheduler=f"127.0.0.1:{free_port()}", retries=0)
    async with serve_gateway(cfg) as url, httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/health")).status_code == 200
        ready = await http.get(f"{url}/ready")
        assert ready.status_code == 503
        models = await http.get(f"{url}/v1/models")
        assert models.status_code == 503 and "UNAVAILABLE" in models.json()["error"]["message"]
        posted = await http.post(
            f"{url}/v1/completions", content=json.dumps({"model": "m", "prompt": "p"})
        )
        assert posted.status_code == 503


def test_grpc_status_table_covers_what_the_issue_names() -> None:
    from services.gateway.errors import _MAPPING

    expected = {
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
    assert {code: _MAPPING[code][0] for code in expected} == expected
