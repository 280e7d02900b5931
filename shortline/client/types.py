"""Plain result types of the client SDK, free of protobuf so callers need not import it."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """How to reach the scheduler.

    ``token`` is sent as ``authorization: Bearer <token>`` metadata on every
    call; with ``tls`` the channel is secure (``root_certificates`` in PEM, or
    the system's roots when None). :meth:`from_files` reads both from files
    and the environment.
    """

    target: str = "127.0.0.1:50051"
    tls: bool = False
    root_certificates: bytes | None = None
    token: str | None = None
    # Default per-call deadline in seconds (None: no deadline). A scheduler that can
    # see the deadline cannot be met refuses at once with DEADLINE_EXCEEDED.
    timeout_seconds: float | None = None
    # Attempts after an UNAVAILABLE failure, with the same request id. Before the
    # request was accepted (the scheduler not up yet) a retry always helps; after, a
    # retry can only continue the same generation when ``reattach_grace_seconds`` is
    # set: without it the scheduler cancelled the request when the stream broke, and
    # the retry ends with ABORTED (which is not retried). The default (6, from 0.2 s
    # doubling: about 12.6 s in all) outlasts a scheduler restart, after which the
    # scheduler has kept the request (its journal) for the client to reattach.
    retries: int = 6
    backoff_seconds: float = 0.2
    # How long the scheduler keeps a request running after its stream breaks, for a
    # retry with the same id to reattach and continue (capped by the scheduler's
    # --max-reattach-grace-s). 0, the default: a client that disappears (closed,
    # killed, its connection lost) frees its slot at once, so no worker keeps
    # generating for nobody. Set it (a few seconds to the time a scheduler restart
    # takes) in a client that retries across a scheduler restart or a network blip.
    reattach_grace_seconds: float = 0.0

    def __post_init__(self) -> None:
        grace = self.reattach_grace_seconds
        if not (math.isfinite(grace) and grace >= 0.0):
            raise ClientConfigError(f"reattach_grace_seconds must be >= 0, got {grace}")

    @classmethod
    def from_files(
        cls,
        target: str = "127.0.0.1:50051",
        *,
        ca_file: str | Path | None = None,
        token_file: str | Path | None = None,
        token: str | None = None,
        tls: bool = False,
        **options: Any,
    ) -> ClientOptions:
        """Options with the CA and the token read from files.

        ``ca_file`` (PEM) turns TLS on and verifies the scheduler against it. The
        token is the first of: ``token``, the contents of ``token_file``, the
        ``SHORTLINE_TOKEN`` variable, the file named by ``SHORTLINE_TOKEN_FILE``.
        Raises :class:`ClientConfigError` naming a file that cannot be read."""
        roots = _read(ca_file, "CA file") if ca_file else None
        if token is None and token_file:
            token = _read(token_file, "token file").decode().strip()
        if token is None and os.environ.get("SHORTLINE_TOKEN"):
            token = os.environ["SHORTLINE_TOKEN"].strip()
        if token is None and os.environ.get("SHORTLINE_TOKEN_FILE"):
            path = os.environ["SHORTLINE_TOKEN_FILE"]
            token = _read(path, "SHORTLINE_TOKEN_FILE").decode().strip()
        return cls(
            target=target,
            tls=tls or roots is not None,
            root_certificates=roots,
            token=token or None,
            **options,
        )


class ClientError(Exception):
    """What the SDK raises itself (gRPC's own errors stay ``grpc.RpcError``)."""


class ClientConfigError(ClientError, ValueError):
    """A CA or token file given to the client cannot be read; the message names it."""


class StreamClosedError(ClientError):
    """The stream was closed by this client (``close()`` of the stream or the client)
    while it was being read; the text delivered so far stays in ``stream.text``."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id!r}: the stream was closed before it ended")
        self.request_id = request_id


class StreamDivergedError(ClientError):
    """A retried stream replayed text that differs from what was already delivered.

    Raised instead of yielding a text made of two different generations: the
    scheduler could not continue the generation the caller was reading (it
    started over, or sampled again), so the caller gets an error and keeps the
    text delivered so far (``stream.text``), never a spliced one."""

    def __init__(self, offset: int, request_id: str = "") -> None:
        who = f"request {request_id!r}: " if request_id else ""
        super().__init__(
            f"{who}the resumed stream differs from the text already delivered at character "
            f"{offset}; it is not the same generation, so it is not continued (the text "
            "delivered before stays as it was)"
        )
        self.offset = offset
        self.request_id = request_id


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc


@dataclasses.dataclass(frozen=True)
class Accepted:
    request_id: str
    predicted_tokens: float
    prediction_source: str
    queue_position: int
    # The predictor's head version that predicted it ("" unless the source is predictor).
    head_version: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    """Final message of a generation, with its timings in seconds."""

    request_id: str
    finish_reason: str
    queue_wait_seconds: float
    time_to_first_token_seconds: float
    completion_seconds: float
    predicted_tokens: float
    actual_tokens: int
    preemptions: int
    prediction_source: str
    worker_id: str
    # The prompt's tokens as the model counted them (0: the model does not report it).
    prompt_tokens: int = 0
    head_version: str = ""


def _enum_name(enum: object, value: int, prefix: str) -> str:
    name: str = enum.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix).lower()


def accepted_from_pb(msg: scheduler_pb2.Accepted) -> Accepted:
    return Accepted(
        request_id=msg.request_id,
        predicted_tokens=msg.predicted_tokens,
        prediction_source=_enum_name(
            scheduler_pb2.PredictionSource, msg.prediction_source, "PREDICTION_SOURCE_"
        ),
        queue_position=msg.queue_position,
        head_version=msg.head_version,
    )


def result_from_pb(msg: scheduler_pb2.GenerateResult) -> Result:
    return Result(
        request_id=msg.request_id,
        finish_reason=_enum_name(common_pb2.FinishReason, msg.finish_reason, "FINISH_REASON_"),
        queue_wait_seconds=msg.queue_wait_seconds,
        time_to_first_token_seconds=msg.time_to_first_token_seconds,
        completion_seconds=msg.completion_seconds,
        predicted_tokens=msg.predicted_tokens,
        actual_tokens=msg.actual_tokens,
        preemptions=msg.preemptions,
        prediction_source=_enum_name(
            scheduler_pb2.PredictionSource, msg.prediction_source, "PREDICTION_SOURCE_"
        ),
        worker_id=msg.worker_id,
        prompt_tokens=msg.prompt_tokens,
        head_version=msg.head_version,
    )


def state_name(value: int) -> str:
    return _enum_name(scheduler_pb2.RequestState, value, "REQUEST_STATE_")


# One message of a conversation: {"role": ..., "content": ...} (OpenAI's shape) or a
# (role, content) pair. Roles: "system", "user", "assistant".
Message = Mapping[str, str] | tuple[str, str]


def chat_messages(messages: Iterable[Message]) -> list[common_pb2.ChatMessage]:
    """The contract's messages; ValueError for a message of another shape."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must have a string role and content")
            out.append(common_pb2.ChatMessage(role=m["role"], content=m["content"]))
        else:
            role, content = m
            out.append(common_pb2.ChatMessage(role=role, content=content))
    return out


def build_request(
    prompt: str,
    *,
    messages: Iterable[Message] | None = None,
    request_id: str,
    model: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    ignore_eos: bool,
    priority: int | None,
    length_model: str,
    reattach_grace_seconds: float = 0.0,
    length_hint: int | None = None,
) -> scheduler_pb2.GenerateRequest:
    """The scheduler's request: a prompt, or ``messages`` (a conversation the worker
    formats with the model's chat template); ValueError unless exactly one is given."""
    sampling = common_pb2.SamplingParams(ignore_eos=ignore_eos)
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    turns = chat_messages(messages) if messages is not None else []
    if bool(prompt) == bool(turns):
        raise ValueError("exactly one of prompt and messages must be given (and not be empty)")
    request = scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=prompt,
        messages=turns,
        max_tokens=max_tokens,
        sampling=sampling,
        length_model=length_model,
    )
    if priority is not None:
        request.priority = priority
    if length_hint is not None:
        request.length_hint = length_hint
    if reattach_grace_seconds > 0.0:
        request.reattach_grace_seconds = reattach_grace_seconds
    return request
