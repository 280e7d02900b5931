"""What is wrong with a request, naming the field (INVALID_ARGUMENT's message).

Admission checks everything a worker would, before the client is sent
``Accepted``: the scheduler's prompt size (``--max-prompt-bytes``), then the
limits the workers serving the model advertised (``WorkerPool.limits``:
max_tokens, prompt characters, sampling ranges, all from
``shortline.common.limits``). A request that arrives before any worker has
joined may queue, as it always could, and is held to the default limits (the
outer bounds every worker's limits lie within). Messages name the limit and
the size, never the prompt itself. A ``reattach_grace_seconds`` above the
scheduler's ``max_reattach_grace_s`` is not an error: it is capped
(:func:`reattach_grace`). A conversation (``messages`` instead of ``prompt``)
is held to the same size limits on its content, at most ``MAX_MESSAGES``
messages with known roles, and only for a model every worker of which applies a
chat template (``ServedLimits.chat``).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from services.scheduler.config import SchedulerConfig
from shortline.common import limits
from shortline.scheduler.v1 import scheduler_pb2

MAX_REQUEST_ID = 128
# A conversation holds at most this many messages; roles a message may have.
MAX_MESSAGES = 256
ROLES = ("system", "user", "assistant")
SHOWN_ROLE_CHARS = 32


@dataclass(frozen=True)
class ServedLimits(limits.ModelLimits):
    """A model's limits in this pool (``WorkerPool.limits``), with whether every worker
    serving it formats chat messages (``ModelLimits.chat``). True before any worker
    has joined, as the other limits are the outer bounds then: a chat request may queue,
    and a worker that cannot format it is never sent it (``WorkerPool.start``)."""

    chat: bool = True


# A message lists at most this many known length models.
_LISTED = 12


def validate(
    request: scheduler_pb2.GenerateRequest,
    cfg: SchedulerConfig,
    model_limits: limits.ModelLimits,
    length_models: Collection[str] | None = None,
) -> str | None:
    """What is wrong with a Generate request, naming the field; None when it is valid.

    ``model_limits`` are the request's model's (``WorkerPool.limits``);
    ``length_models`` the targets the predictor has heads for, None while they are
    not known (no predictor, or it has not answered ListModels yet): then any
    length model is accepted and predicted by the fallback."""
    if not 1 <= len(request.request_id) <= MAX_REQUEST_ID:
        return f"request_id must be 1..{MAX_REQUEST_ID} characters, got {len(request.request_id)}"
    if not request.request_id.isprintable():
        # Ids reach log lines: a newline in one could forge another line.
        return "request_id must be printable characters (no control characters or newlines)"
    if not request.model:
        return "model must not be empty"
    if len(request.model) > limits.MAX_NAME_CHARS:
        return f"model must be at most {limits.MAX_NAME_CHARS} characters, got {len(request.model)}"
    if request.prompt and request.messages:
        return "exactly one of prompt and messages must be set, got both"
    if not request.prompt and not request.messages:
        return "prompt must not be empty (or send messages instead: exactly one of the two)"
    if request.messages:
        problem = _messages(request, cfg, model_limits)
        if problem is not None:
            return problem
        prompt = "".join(m.content for m in request.messages)
    else:
        prompt = request.prompt
        size = _size(prompt)
        if size > cfg.max_prompt_bytes:
            return (
                f"prompt must be at most {cfg.max_prompt_bytes} UTF-8 bytes (max_prompt_bytes), "
                f"got {size}"
            )
    problem = _length_model(request.length_model, length_models)
    if problem is not None:
        return problem
    if request.HasField("length_hint") and request.length_hint < 1:
        return "length_hint must be at least 1 token (leave it out to use the predictor)"
    if request.HasField("reattach_grace_seconds"):
        grace = request.reattach_grace_seconds
        if not (math.isfinite(grace) and grace >= 0.0):
            return f"reattach_grace_seconds must be a finite number >= 0, got {grace}"
    return limits.validate(request.sampling, request.max_tokens, prompt, model_limits)


def _size(text: str) -> int:
    # An ASCII text's length is its size: no copy of up to a megabyte to count it.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _messages(
    request: scheduler_pb2.GenerateRequest, cfg: SchedulerConfig, model_limits: limits.ModelLimits
) -> str | None:
    """What is wrong with a chat request's messages. The scheduler does not know the
    model's template: it holds the messages' content to the prompt limits (the worker
    holds the formatted conversation to its max_prompt_chars again)."""
    messages = request.messages
    if len(messages) > MAX_MESSAGES:
        count = len(messages)
        return f"messages must hold at most {MAX_MESSAGES} messages (max_messages), got {count}"
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            shown = repr(m.role[:SHOWN_ROLE_CHARS])
            return f"messages[{i}].role must be one of {', '.join(ROLES)}, got {shown}"
    chars = sum(len(m.content) for m in messages)
    if chars == 0:
        return "messages must not all be empty"
    if chars > model_limits.max_prompt_chars:
        return (
            f"messages must hold at most {model_limits.max_prompt_chars} characters of content "
            f"for model {model_limits.model[: limits.MAX_NAME_CHARS]!r} (max_prompt_chars), "
            f"got {chars}"
        )
    size = sum(_size(m.content) for m in messages)
    if size > cfg.max_prompt_bytes:
        return (
            f"messages must hold at most {cfg.max_prompt_bytes} UTF-8 bytes of content "
            f"(max_prompt_bytes), got {size}"
        )
    if isinstance(model_limits, ServedLimits) and not model_limits.chat:
        return (
            f"messages are not supported by model {model_limits.model[: limits.MAX_NAME_CHARS]!r}: "
            "a worker serving it has no chat template for it (the raw prompt format) or "
            "predates chat messages; send a prompt"
        )
    return None


def predictor_text(request: scheduler_pb2.GenerateRequest) -> str:
    """What the predictor predicts from (and the outcome log and semantic cache keep):
    the prompt, or a conversation's last user message. The heads were trained on
    single instructions (alpaca_eval); the last user message is the one instruction
    being answered, while the formatted conversation would add template markers and
    earlier turns the heads never saw (and the scheduler does not know the template).
    A conversation without a user message: its last message."""
    if not request.messages:
        return request.prompt
    for m in reversed(request.messages):
        if m.role == "user":
            return m.content
    return request.messages[-1].content


def reattach_grace(request: scheduler_pb2.GenerateRequest, cfg: SchedulerConfig) -> float:
    """How long a (validated) request outlives its last stream: what it asked for, at
    most ``max_reattach_grace_s``; 0 when it did not ask (cancelled at once)."""
    if not request.HasField("reattach_grace_seconds"):
        return 0.0
    return min(request.reattach_grace_seconds, max(cfg.max_reattach_grace_s, 0.0))


def _length_model(name: str, known: Collection[str] | None) -> str | None:
    if len(name) > limits.MAX_NAME_CHARS:
        return f"length_model must be at most {limits.MAX_NAME_CHARS} characters, got {len(name)}"
    if not name or known is None or name in known:
        return None
    listed = sorted(known)
    more = f", and {len(listed) - _LISTED} more" if len(listed) > _LISTED else ""
    return (
        f"length_model {name!r} has no predictor head; known: "
        f"{', '.join(listed[:_LISTED])}{more} (or leave it empty for the default)"
    )


def validate_registration(request: scheduler_pb2.RegisterWorkerRequest) -> str | None:
    """What is wrong with a RegisterWorker request; None when it is valid."""
    if not request.worker_id or not request.address:
        return "worker_id and address must not be empty"
    if request.slots < 1:
        return f"slots must be >= 1, got {request.slots}"
    for item in request.limits:
        if item.model not in request.models:
            return f"limits names model {item.model[: limits.MAX_NAME_CHARS]!r}, not in models"
    return None
