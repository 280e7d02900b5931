"""Chat requests in the scheduler: admission (exactly one of prompt and messages,
roles, counts, sizes, models whose workers format chat), the fingerprint of a reused
id, the predictor's text, and the journal: a restarted scheduler resumes a chat
request with its messages, and reads a journal of the schema before chat."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.chat import ChatRequest, messages_of
from services.scheduler.service.clock import MonotonicClock
from services.scheduler.service.dataplane import SchedulerService
from services.scheduler.service.journal import Journal
from services.scheduler.service.journal_rows import SCHEMA_VERSION
from services.scheduler.service.tenancy import FINGERPRINT_FIELDS, differing_field, fingerprint
from services.scheduler.service.validation import (
    MAX_MESSAGES,
    ServedLimits,
    predictor_text,
    validate,
)
from shortline.common.limits import ModelLimits
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

M = common_pb2.ChatMessage
CONVERSATION = [
    M(role="system", content="Be brief."),
    M(role="user", content="Name a river."),
    M(role="assistant", content="The Nile."),
    M(role="user", content="Another?"),
]


def _chat(
    rid: str = "c1", messages: list[M] | None = None, **kw: Any
) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        request_id=rid,
        model="replay",
        messages=CONVERSATION if messages is None else messages,
        max_tokens=30,
        **kw,
    )


def _problem(request: scheduler_pb2.GenerateRequest, limits: ModelLimits | None = None) -> str:
    got = validate(request, SchedulerConfig(), limits or ServedLimits("replay"))
    assert got is not None
    return got


def test_a_valid_chat_request_is_admitted() -> None:
    assert validate(_chat(), SchedulerConfig(), ServedLimits("replay")) is None


def test_exactly_one_of_prompt_and_messages() -> None:
    assert "exactly one of prompt and messages" in _problem(_chat(prompt="hi"))
    neither = scheduler_pb2.GenerateRequest(request_id="x", model="replay", max_tokens=3)
    assert "prompt" in _problem(neither) and "messages" in _problem(neither)


def test_roles_counts_and_sizes_are_named() -> None:
    bad_role = _chat(messages=[M(role="user", content="a"), M(role="tool", content="b")])
    assert _problem(bad_role).startswith("messages[1].role must be one of system, user")
    assert "'tool'" in _problem(bad_role)
    many = _chat(messages=[M(role="user", content="a")] * (MAX_MESSAGES + 1))
    assert "max_messages" in _problem(many) and str(MAX_MESSAGES + 1) in _problem(many)
    small = ServedLimits("replay", max_prompt_chars=10)
    big = _chat(messages=[M(role="user", content="x" * 6), M(role="user", content="y" * 5)])
    assert "max_prompt_chars" in _problem(big, small) and "got 11" in _problem(big, small)
    tight = validate(
        _chat(messages=[M(role="user", content="é" * 8)]),
        SchedulerConfig(max_prompt_bytes=10),
        ServedLimits("replay"),
    )
    assert tight is not None and "max_prompt_bytes" in tight
    assert "empty" in _problem(_chat(messages=[M(role="user", content="")]))


def test_a_model_whose_workers_do_not_format_chat_is_refused_naming_it() -> None:
    problem = _problem(_chat(), ServedLimits("replay", chat=False))
    assert problem.startswith("messages are not supported by model 'replay'")
    # The sampling and max_tokens checks still apply to chat requests.
    assert "max_tokens" in _problem(_chat(), ServedLimits("replay", max_tokens=10))


def test_the_predictor_reads_the_last_user_message() -> None:
    assert predictor_text(_chat()) == "Another?"
    only_system = _chat(messages=[M(role="system", content="S")])
    assert predictor_text(only_system) == "S"
    assert predictor_text(scheduler_pb2.GenerateRequest(prompt="p")) == "p"


def test_a_reused_id_with_other_messages_is_named_and_old_fingerprints_still_match() -> None:
    kept = fingerprint(_chat())
    assert differing_field(kept, _chat()) is None
    other = [*CONVERSATION[:-1], M(role="user", content="Another!")]
    assert differing_field(kept, _chat(messages=other)) == "messages"
    # Role and content boundaries count: ("ab", "c") is not ("a", "bc").
    a = [M(role="user", content="ab"), M(role="user", content="c")]
    b = [M(role="user", content="a"), M(role="user", content="bc")]
    assert differing_field(fingerprint(_chat(messages=a)), _chat(messages=b)) == "messages"
    # A prompt request journaled before chat has one digest per field but messages.
    prompt = scheduler_pb2.GenerateRequest(request_id="p", model="replay", prompt="hi")
    old = fingerprint(prompt)[: FINGERPRINT_FIELDS.index("messages")]
    assert differing_field(old, prompt) is None
    assert differing_field(old, _chat("p")) == "prompt"


@pytest.mark.asyncio
async def test_a_restarted_scheduler_resumes_a_chat_request_with_its_messages(
    tmp_path: Path,
) -> None:
    cfg = SchedulerConfig(restart_reattach_s=5.0)
    path = tmp_path / "j.sqlite"
    plane = SchedulerService(cfg, None, Journal(path, MonotonicClock()))
    plane.start()
    req = plane.admit(_chat("c1"), remaining=None, tenant="acme")
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert req.accepted is not None
    assert isinstance(req, ChatRequest) and req.job.prompt == "Another?"
    req.add_text(" so far", 2)
    await asyncio.sleep(0.02)
    assert plane.journal is not None
    plane.journal._lock_file.close()  # a crash: nothing closed

    plane2 = SchedulerService(cfg, None, Journal(path, MonotonicClock()))
    plane2.start()
    again = plane2.lookup("c1", "acme")
    assert again is not None
    assert list(messages_of(again)) == CONVERSATION
    assert again.job.prompt == "Another?" and again.text == " so far" and again.tokens == 2
    # Its fingerprint came back whole: the same conversation reattaches, another is named.
    assert differing_field(again.fingerprint, _chat("c1")) is None
    other = _chat("c1", messages=CONVERSATION[:2])
    assert differing_field(again.fingerprint, other) == "messages"
    # Once it ends, neither memory nor the journal keeps the conversation.
    plane2.cancel(again)
    await asyncio.sleep(0.02)
    assert messages_of(again) == ()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT messages FROM requests").fetchall() == [(None,)]
    await plane2.close()


def test_a_journal_of_the_schema_before_chat_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path, MonotonicClock()).close()
    with sqlite3.connect(path) as conn:  # the file as version 1 left it
        conn.execute("ALTER TABLE requests DROP COLUMN messages")
        conn.execute(
            "INSERT INTO requests(key, request_id, tenant, arrival, model, length_model,"
            " prompt, max_tokens, sampling, fingerprint, reattach_grace)"
            " VALUES ('r', 'r', '', 1.0, 'replay', '', 'hi', 5, x'', x'', 0)"
        )
        conn.execute("PRAGMA user_version=1")
    journal = Journal(path, MonotonicClock())
    (record,) = journal.load(ttl_s=600).live
    journal.close()
    assert record.prompt == "hi" and record.messages is None
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
