"""A chat request's record: the conversation the worker formats at each run.

A chat request (``GenerateRequest.messages``) is a :class:`streams.Request`
that also holds its messages, sent in every ``ExecuteRequest`` (the first run,
and each resume after a preemption, a lost worker or a restart), journaled as
JSON and reloaded by ``restore``. The core's job holds the predictor's text
(``validation.predictor_text``), as for any request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.service.streams import Request
from shortline.common.v1 import common_pb2

Messages = tuple[common_pb2.ChatMessage, ...]


@dataclass(eq=False)
class ChatRequest(Request):
    messages: Messages = ()


def messages_of(req: Request) -> Messages:
    """The request's conversation; empty for a prompt (or once the request ended)."""
    return req.messages if isinstance(req, ChatRequest) else ()


def copy_messages(messages: Sequence[common_pb2.ChatMessage]) -> Messages:
    """Messages of their own: the request's repeated field belongs to the RPC's message."""
    return tuple(common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages)


def to_json(messages: Sequence[common_pb2.ChatMessage]) -> str | None:
    """The journal's column: ``[[role, content], ...]``; None (NULL) for a prompt."""
    if not messages:
        return None
    return json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)


def from_json(text: str | None) -> Messages:
    if not text:
        return ()
    return tuple(common_pb2.ChatMessage(role=str(r), content=str(c)) for r, c in json.loads(text))
