"""Plain result types of the client SDK, free of protobuf so callers need not import it."""

from __future__ import annotations

import dataclasses
import os
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
    # Default per-call deadline in seconds (None: no deadline).
    timeout_seconds: float | None = None
    # Attempts after an UNAVAILABLE failure, with the same request id.
    retries: int = 3
    backoff_seconds: float = 0.2

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


class ClientConfigError(ValueError):
    """A CA or token file given to the client cannot be read; the message names it."""


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
    )


def state_name(value: int) -> str:
    return _enum_name(scheduler_pb2.RequestState, value, "REQUEST_STATE_")


def build_request(
    prompt: str,
    *,
    request_id: str,
    model: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    ignore_eos: bool,
    priority: int | None,
    length_model: str,
) -> scheduler_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(ignore_eos=ignore_eos)
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    request = scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=sampling,
        length_model=length_model,
    )
    if priority is not None:
        request.priority = priority
    return request
