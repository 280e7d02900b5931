"""Bearer tokens and tenants on the scheduler's public API, over real gRPC with real
workers on the embedded Triton: each attack of issue 15 on tokens and request ids,
as a test that fails for the attacker."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_stack import Stack, replay_text, stack, wait_for

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from services.scheduler.service.tenancy import (
    TenancyConfigError,
    TokensFileError,
    shown_id,
    unknown_message,
)
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

A_TOKEN = "token-of-team-a-0123456789"
B_TOKEN = "token-of-team-b-abcdefghij"
C_TOKEN = "token-of-team-c-klmnopqrst"
LIMITED_TOKEN = "token-of-limited-uvwxyz0"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


A, B, C, LIMITED = (bearer(t) for t in (A_TOKEN, B_TOKEN, C_TOKEN, LIMITED_TOKEN))


def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    b_digest = hashlib.sha256(B_TOKEN.encode()).hexdigest()
    path.write_text(
        # team-a may ask for bands up to 5 and send length hints: a reused id that
        # changes them is then a reuse, not a refusal of the field itself.
        f'[[token]]\ntenant = "team-a"\ntoken = "{A_TOKEN}"\nmax_priority = 5\n'
        "length_hints = true\n\n"
        f'[[token]]\ntenant = "team-b"\nsha256 = "{b_digest}"\n\n'
        f'[[token]]\ntenant = "team-c"\ntoken = "{C_TOKEN}"\n\n'
        f'[[token]]\ntenant = "limited"\ntoken = "{LIMITED_TOKEN}"\n'
        'models = ["smollm2-135m-instruct"]\n'
    )
    return path


def tenant_stack(triton: Any, tmp_path: Path, **cfg: Any) -> Any:
    return stack(triton.grpc_url, tmp_path, tokens_file=str(tokens_file(tmp_path)), **cfg)


async def run(
    s: Stack,
    request_id: str,
    max_tokens: int,
    metadata: tuple[tuple[str, str], ...],
    prompt: str = "go",
    **fields: Any,
) -> tuple[list[scheduler_pb2.GenerateResponse], str]:
    """One Generate stream with any GenerateRequest fields (sampling included)."""
    fields.setdefault("sampling", common_pb2.SamplingParams(ignore_eos=True))
    call = s.stub.Generate(
        scheduler_pb2.GenerateRequest(
            request_id=request_id,
            model=fields.pop("model", "replay"),
            prompt=prompt,
            max_tokens=max_tokens,
            **fields,
        ),
        metadata=metadata,
        timeout=60,
    )
    msgs = [m async for m in call]
    return msgs, "".join(m.delta.text for m in msgs if m.HasField("delta"))


async def code_of(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details() or ""


@pytest.mark.slow
async def test_no_or_wrong_token_is_unauthenticated_on_every_public_rpc(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with tenant_stack(embedded_triton, tmp_path) as s:
        stub = s.stub
        without: tuple[tuple[str, str], ...] = ()
        wrong = bearer("not-a-token-of-anyone")
        basic = (("authorization", "Basic dXNlcjpwYXNz"),)
        calls: dict[str, Any] = {
            "Generate": lambda md: run(s, "r", 3, md),
            "Cancel": lambda md: stub.Cancel(
                scheduler_pb2.CancelRequest(request_id="r"), metadata=md
            ),
            "GetStats": lambda md: stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=md),
            "ListModels": lambda md: stub.ListModels(
                scheduler_pb2.ListModelsRequest(), metadata=md
            ),
        }
        for name, make in calls.items():
            for md, expected in (
                (without, "missing bearer token"),
                (wrong, "invalid bearer token"),
                (basic, "invalid bearer token"),
                (bearer(A_TOKEN + "x"), "invalid bearer token"),
            ):
                code, details = await code_of(make(md))
                assert code == grpc.StatusCode.UNAUTHENTICATED, (name, md)
                assert details.startswith(expected), (name, details)
        # Nothing ran for any of them; with a token, the same calls work.
        stats = await stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=A)
        assert stats.completed == 0 and stats.queue_depth == 0 and stats.running == 0
        _, text = await run(s, "r", 3, A)
        assert text == replay_text(1, 3)
        # The scheme is case-insensitive.
        _, text = await run(s, "r2", 2, (("authorization", f"bearer {A_TOKEN}"),))
        assert text == replay_text(1, 2)


@pytest.mark.slow
async def test_another_tenant_cannot_cancel_attach_or_replay_a_request(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with tenant_stack(embedded_triton, tmp_path, slots=2) as s:
        plane = s.scheduler.plane
        secret_prompt = "the password is hunter2"
        first = asyncio.create_task(run(s, "shared-id", 120, A, prompt=secret_prompt))
        await wait_for(
            lambda: (r := plane.lookup("shared-id", "team-a")) is not None and r.tokens >= 3
        )
        # Cancel: NOT_FOUND, word for word what an id nobody used gets.
        code, details = await code_of(
            s.stub.Cancel(scheduler_pb2.CancelRequest(request_id="shared-id"), metadata=B)
        )
        _, unknown = await code_of(
            s.stub.Cancel(scheduler_pb2.CancelRequest(request_id="never-used"), metadata=B)
        )
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == unknown_message("shared-id")
        assert unknown == unknown_message("never-used")
        # Attach: the same id from team-b is team-b's own request, not team-a's text.
        b_msgs, b_text = await run(s, "shared-id", 5, B, prompt="another prompt")
        assert b_text == replay_text(1, 5)
        assert b_msgs[-1].result.request_id == "shared-id"
        assert b_msgs[-1].result.actual_tokens == 5
        a_req, b_req = plane.lookup("shared-id", "team-a"), plane.lookup("shared-id", "team-b")
        assert a_req is not None and b_req is not None and a_req is not b_req
        assert not a_req.job.terminal  # team-b's calls left it running
        a_msgs, a_text = await first
        assert a_text == replay_text(1, 120)
        assert a_msgs[-1].result.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert a_msgs[0].accepted.request_id == "shared-id"
        # Replay: after it finished, team-c asking the very same request runs its own.
        before = (await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=C)).completed
        c_msgs, c_text = await run(s, "shared-id", 120, C, prompt=secret_prompt)
        after = (await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=C)).completed
        assert after == before + 1  # it ran again: nothing of team-a's was handed over
        assert c_text == replay_text(1, 120) and c_msgs[-1].result.request_id == "shared-id"
        # While team-a, within the result TTL, gets its own result replayed.
        again_msgs, again_text = await run(s, "shared-id", 120, A, prompt=secret_prompt)
        assert again_text == a_text and again_msgs[-1].result == a_msgs[-1].result
        # Nor can any other tenant cancel it after the fact.
        code, _ = await code_of(
            s.stub.Cancel(scheduler_pb2.CancelRequest(request_id="shared-id"), metadata=LIMITED)
        )
        assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
async def test_a_reused_id_must_be_the_same_request(embedded_triton: Any, tmp_path: Path) -> None:
    async with tenant_stack(embedded_triton, tmp_path) as s:
        plane = s.scheduler.plane
        prompt = "my private prompt text"
        first = asyncio.create_task(run(s, "reuse", 60, A, prompt=prompt))
        await wait_for(lambda: (r := plane.lookup("reuse", "team-a")) is not None and r.tokens >= 3)
        changes: dict[str, dict[str, Any]] = {
            "prompt": {"prompt": "a different text entirely"},
            "max_tokens": {"max_tokens": 61},
            "sampling": {"sampling": common_pb2.SamplingParams(ignore_eos=True, temperature=0.7)},
            "length_model": {"length_model": "gpt-4"},
            "priority": {"priority": 3},
            "length_hint": {"length_hint": 7},
        }
        try:
            for field, change in changes.items():
                kwargs: dict[str, Any] = {"prompt": prompt, "max_tokens": 60, **change}
                n = kwargs.pop("max_tokens")
                code, details = await code_of(run(s, "reuse", n, A, **kwargs))
                assert code == grpc.StatusCode.ALREADY_EXISTS, (field, code, details)
                assert f"another {field};" in details and "'reuse'" in details
                assert prompt not in details and "different text" not in details
        except BaseException:  # a failed check leaves no stream behind
            first.cancel()
            raise
        # The identical retry attaches to the running job; the job ran once.
        second_msgs, second_text = await run(s, "reuse", 60, A, prompt=prompt)
        first_msgs, first_text = await first
        assert first_text == second_text == replay_text(1, 60)
        assert first_msgs[-1].result == second_msgs[-1].result
        # Finished, within the TTL: another prompt is still refused, the same replays.
        code, details = await code_of(run(s, "reuse", 60, A, prompt="later prompt"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "another prompt;" in details
        third_msgs, _ = await run(s, "reuse", 60, A, prompt=prompt)
        assert third_msgs[-1].result == first_msgs[-1].result
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=A)
        assert stats.completed == 1


@pytest.mark.slow
async def test_a_model_the_tenant_may_not_use_is_permission_denied(
    embedded_triton: Any, tmp_path: Path
) -> None:
    async with tenant_stack(embedded_triton, tmp_path) as s:
        code, details = await code_of(run(s, "m1", 3, LIMITED))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "'limited'" in details and "'replay'" in details
        assert "smollm2-135m-instruct" in details
        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=LIMITED)
        assert stats.completed == 0 and stats.queue_depth == 0
        # ListModels shows each tenant the served models it may use.
        listed = await s.stub.ListModels(scheduler_pb2.ListModelsRequest(), metadata=A)
        assert "replay" in [m.model for m in listed.models]
        listed = await s.stub.ListModels(scheduler_pb2.ListModelsRequest(), metadata=LIMITED)
        assert "replay" not in [m.model for m in listed.models]


@pytest.mark.slow
async def test_tokens_rotate_while_the_scheduler_runs(
    embedded_triton: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with tenant_stack(embedded_triton, tmp_path) as s:
        _, text = await run(s, "before", 2, A)
        assert text == replay_text(1, 2)
        rotated = "rotated-token-of-team-a-42"
        path = tmp_path / "tokens.toml"
        tmp = tmp_path / "tokens.new"
        tmp.write_text(f'[[token]]\ntenant = "team-a"\ntoken = "{rotated}"\n')
        os.replace(tmp, path)

        async def accepted(md: tuple[tuple[str, str], ...]) -> bool:
            try:
                await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=md)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while not await accepted(bearer(rotated)):
            assert loop.time() < deadline, "the rotated token was never accepted"
            await asyncio.sleep(0.1)
        # The old tokens are gone with the file that held them; the new one works.
        assert not await accepted(A) and not await accepted(B)
        _, text = await run(s, "after", 2, bearer(rotated))
        assert text == replay_text(1, 2)
        # A broken rewrite keeps the rotated token in force.
        path.write_text('[[token]]\ntenant = "team-a"\ntoken = ')
        await asyncio.sleep(1.2)
        assert await accepted(bearer(rotated))
        # Team-a's requests are team-a's across the rotation (same tenant, same id).
        again, _ = await run(s, "before", 2, bearer(rotated))
        assert again[-1].result.request_id == "before"
        assert (
            await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), metadata=bearer(rotated))
        ).completed == 2
    for secret in (A_TOKEN, B_TOKEN, rotated):
        assert secret not in caplog.text


@pytest.mark.slow
async def test_job_ids_sent_to_workers_reveal_no_request_id(
    embedded_triton: Any, tmp_path: Path
) -> None:
    request_id = "customer-4711-invoice-request"
    async with tenant_stack(embedded_triton, tmp_path) as s:
        plane = s.scheduler.plane
        slots = s.workers[0].servicer.slots
        task = asyncio.create_task(run(s, request_id, 400, A))
        await wait_for(
            lambda: (r := plane.lookup(request_id, "team-a")) is not None and r.tokens >= 3
        )
        running = list(slots._running)  # the job ids the worker was sent
        assert len(running) == 1
        (job_id,) = running
        assert re.fullmatch(r"[0-9a-f]{24}", job_id)
        assert "customer" not in job_id and "team-a" not in job_id
        req = plane.lookup(request_id, "team-a")
        assert req is not None and req.run_key == job_id
        # Cancel reaches the worker under that key: its slot frees, the stream ends.
        reply = await s.stub.Cancel(scheduler_pb2.CancelRequest(request_id=request_id), metadata=A)
        assert reply.state == scheduler_pb2.REQUEST_STATE_CANCELLED
        msgs, _ = await task
        assert msgs[-1].result.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert msgs[-1].result.actual_tokens < 400
        await wait_for(lambda: slots.used == 0)
        # Each run gets a fresh key.
        await run(s, "next-one", 3, A)
        after = plane.lookup("next-one", "team-a")
        assert after is not None and after.run_key not in ("", job_id)


def _config(tmp_path: Path, **kw: Any) -> SchedulerConfig:
    return SchedulerConfig(
        port=free_port(), internal_port=0, outcome_log=str(tmp_path / "o.sqlite"), **kw
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_a_reachable_host_without_a_tokens_file_refuses_to_start(tmp_path: Path, host: str) -> None:
    with pytest.raises(TenancyConfigError, match=r"no --tokens-file is given.*Give --tokens-file"):
        SchedulerServer(_config(tmp_path, host=host))


def test_a_bad_tokens_file_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.toml"
    bad.write_text('[[token]]\ntenant = "a b"\ntoken = "t"\n')
    with pytest.raises(TokensFileError, match=r"tokens\.toml.*entry 1: tenant must match"):
        SchedulerServer(_config(tmp_path, host="127.0.0.1", tokens_file=str(bad)))
    with pytest.raises(TokensFileError, match="cannot read tokens file"):
        SchedulerServer(_config(tmp_path, host="127.0.0.1", tokens_file=str(tmp_path / "none")))


async def test_the_start_says_how_callers_are_identified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = "services.scheduler.service.tenancy"
    with caplog.at_level(logging.INFO, logger=logger):
        server = SchedulerServer(_config(tmp_path, host="127.0.0.1"))
        await server.stop(0)
    lines = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(lines) == 1
    assert "no authentication" in lines[0] and "loopback" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger):
        server = SchedulerServer(
            _config(tmp_path, host="127.0.0.1", tokens_file=str(tokens_file(tmp_path)))
        )
        await server.stop(0)
    lines = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(lines) == 1 and "4 tokens, 4 tenants" in lines[0]
    assert A_TOKEN not in caplog.text


def test_ids_echoed_in_messages_are_truncated() -> None:
    long = "x" * 500
    assert shown_id(long) == repr("x" * 64) + "…"
    assert shown_id("short") == "'short'"
    assert len(unknown_message(long)) < 100
