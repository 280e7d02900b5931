"""An OpenAI completions or chat completions request, checked field by field.

Every field is either mapped to the scheduler's request, accepted only at the
value that means "off" (``echo: false``, ``best_of: 1``, ...), or refused with
a 400 naming it: a parameter the client sent is never silently ignored. Range
checks the scheduler does itself (max_tokens against the model, temperature,
stop sizes) are left to it, so there is one copy of each limit; its
INVALID_ARGUMENT comes back as a 400 naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from services.gateway.errors import ApiError, bad_param, unsupported

# OpenAI's default for /v1/completions.
DEFAULT_MAX_TOKENS = 16
# OpenAI's chat default is the rest of the model's context; here a bound a chat
# answer rarely reaches (the scheduler refuses more than the model's limit).
DEFAULT_CHAT_MAX_TOKENS = 512
CHAT_ROLES = ("system", "user", "assistant")
INT32 = 2**31
SEED_LIMIT = 2**63

# Accepted only at the value that changes nothing (or null).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "echo": (False,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "logprobs": (),
    "suffix": ("",),
}
_WHY = {
    "best_of": "only 1",
    "echo": "only false",
    "frequency_penalty": "only 0",
    "presence_penalty": "only 0",
    "logit_bias": "only empty",
    "logprobs": "no log probabilities are returned",
    "suffix": "no insertion",
}
_MAPPED = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "user",
    "stream",
    "stream_options",
    # Shortline's own (documented in docs/gateway.md)
    "priority",
    "deadline_seconds",
    "length_hint",
    "length_model",
    "ignore_eos",
    "top_k",
    "repetition_penalty",
}


# Chat: as completions, less what chat has not (prompt, echo, suffix, best_of), plus
# messages and max_completion_tokens; logprobs is a boolean there.
_CHAT_MAPPED = (_MAPPED - {"prompt"}) | {"messages", "max_completion_tokens"}
_CHAT_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "logprobs": (False,),
    "parallel_tool_calls": (False,),
    "tools": ([],),
}
_CHAT_WHY = {
    "frequency_penalty": "only 0",
    "presence_penalty": "only 0",
    "logit_bias": "only empty",
    "logprobs": "no log probabilities are returned",
    "parallel_tool_calls": "no tools",
    "tools": "no tools",
}


@dataclass(frozen=True)
class CompletionParams:
    model: str
    prompt: str
    # A chat request's conversation (role, content), sent instead of the prompt.
    messages: tuple[tuple[str, str], ...] = ()
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stream: bool = False
    include_usage: bool = False
    priority: int | None = None
    deadline_seconds: float | None = None
    length_hint: int | None = None
    length_model: str = ""
    ignore_eos: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_param(name, f"{name} must be a finite number")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value < high:
        raise bad_param(name, f"{name} must be an integer in [{low}, {high})")
    return int(value)


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_param(name, f"{name} must be a string")
    return value


def _prompt(value: Any) -> str:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise unsupported(
                "prompt", "one prompt per request, as a string (no batches, no token ids)"
            )
        value = value[0]
    if not isinstance(value, str) or not value:
        raise bad_param("prompt", "prompt must be a non-empty string")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_param("stop", "stop must be a string or a list of strings")


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_param("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict):
        raise bad_param("stream_options", "stream_options must be an object")
    for key in options:
        if key != "include_usage":
            raise unsupported(f"stream_options.{key}")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad_param("stream_options.include_usage", "include_usage must be a boolean")
    return usage


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_param(name, f"{name} must be a boolean")
    return value


def _neutral(name: str, value: Any, neutral: dict[str, tuple[Any, ...]]) -> bool:
    allowed = neutral[name]
    if any(isinstance(v, bool) for v in allowed):
        return any(value is v for v in allowed)
    # True == 1 in Python: a boolean is never a neutral number.
    return not isinstance(value, bool) and value in allowed


def _check_fields(
    body: Any, mapped: set[str], neutral: dict[str, tuple[Any, ...]], why: dict[str, str]
) -> dict[str, Any]:
    """The body as an object whose every field is mapped or at its neutral value."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in mapped or value is None:
            continue
        if name in neutral:
            if _neutral(name, value, neutral):
                continue
            raise unsupported(name, why[name])
        raise unsupported(name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "model must be a non-empty string")
    return body


def _common(
    body: dict[str, Any], max_deadline_s: float, max_tokens: int | None, default_max_tokens: int
) -> dict[str, Any]:
    """The fields completions and chat share, as CompletionParams' keywords."""
    n = body.get("n")
    if n is not None and n != 1:
        raise unsupported("n", "only n=1 (one choice per request)")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_param("user", "user must be a string")
    stream = _flag(body, "stream")
    deadline = _number(body, "deadline_seconds")
    if deadline is not None and not 0 < deadline <= max_deadline_s:
        raise bad_param("deadline_seconds", f"deadline_seconds must be in (0, {max_deadline_s:g}]")
    return dict(
        model=body["model"],
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        top_k=_integer(body, "top_k", 0, INT32),
        repetition_penalty=_number(body, "repetition_penalty"),
        seed=_integer(body, "seed", 0, SEED_LIMIT),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=_include_usage(body, stream),
        priority=_integer(body, "priority", -INT32, INT32),
        deadline_seconds=deadline,
        length_hint=_integer(body, "length_hint", 1, INT32),
        length_model=_text(body, "length_model"),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def parse_completion(body: Any, max_deadline_s: float) -> CompletionParams:
    """The request's parameters; ApiError (400) naming the first field that is wrong."""
    body = _check_fields(body, _MAPPED, _NEUTRAL, _WHY)
    if "prompt" not in body:
        raise bad_param("prompt", "prompt is required")
    max_tokens = _integer(body, "max_tokens", 1, INT32)
    common = _common(body, max_deadline_s, max_tokens, DEFAULT_MAX_TOKENS)
    return CompletionParams(prompt=_prompt(body["prompt"]), **common)


def parse_chat(body: Any, max_deadline_s: float) -> CompletionParams:
    """A chat request's parameters (its messages as (role, content) pairs); ApiError
    (400) naming the first field that is wrong."""
    body = _check_fields(body, _CHAT_MAPPED, _CHAT_NEUTRAL, _CHAT_WHY)
    if "messages" not in body:
        raise bad_param("messages", "messages is required")
    messages = _messages(body["messages"])
    old = _integer(body, "max_tokens", 1, INT32)
    new = _integer(body, "max_completion_tokens", 1, INT32)
    if old is not None and new is not None and old != new:
        raise bad_param(
            "max_completion_tokens", "max_tokens and max_completion_tokens differ: send one"
        )
    max_tokens = new if new is not None else old
    common = _common(body, max_deadline_s, max_tokens, DEFAULT_CHAT_MAX_TOKENS)
    return CompletionParams(prompt="", messages=messages, **common)


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise unsupported(f"{where}[{i}]", "only text content parts")
            if set(part) - {"type", "text"}:
                raise unsupported(f"{where}[{i}]", "a text part has only type and text")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_param(f"{where}[{i}].text", f"{where}[{i}].text must be a string")
            texts.append(text)
        return "".join(texts)
    raise bad_param(where, f"{where} must be a string or a list of text parts")


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    """(role, content) pairs. The number of messages and their size are the
    scheduler's to check (one copy of each limit): its 400 names them."""
    if not isinstance(value, list) or not value:
        raise bad_param("messages", "messages must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_param(where, f"{where} must be an object with role and content")
        for key in m:
            if key not in ("role", "content") and m[key] is not None:
                raise unsupported(f"{where}.{key}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            shown = repr(role)[:40]
            raise bad_param(
                f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {shown}"
            )
        out.append((str(role), _content(m.get("content"), f"{where}.content")))
    return tuple(out)
