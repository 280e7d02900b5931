"""Plain result types of the client SDK, free of protobuf so callers need not import it."""

from __future__ import annotations

import dataclasses

from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """How to reach the scheduler.

    ``token`` is sent as ``authorization: Bearer <token>`` metadata on every
    call; with ``tls`` the channel is secure (``root_certificates`` in PEM, or
    the system's roots when None).
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
