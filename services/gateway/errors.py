"""OpenAI's error body, and the HTTP status each scheduler (gRPC) status becomes.

OpenAI clients branch on the HTTP status (the ``openai`` package raises
``NotFoundError`` for 404, retries 429 and 5xx honouring ``Retry-After``), so
the mapping is the contract here; the body says why, as the scheduler did.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import grpc

# What the scheduler puts in trailing metadata with RESOURCE_EXHAUSTED.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# A scheduler message that names a field starts with it ("max_tokens must be ...").
_FIELD = re.compile(r"^([a-z_]+)\b")
# The request fields a scheduler message may name, as OpenAI names them.
_PARAMS = {
    "model": "model",
    "prompt": "prompt",
    "messages": "messages",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repetition_penalty": "repetition_penalty",
    "length_model": "length_model",
    "priority": "priority",
    "length_hint": "length_hint",
}

# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code).
_MAPPING: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error", "aborted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "deadline_exceeded"),
}


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json(self) -> str:
        return json.dumps(self.body())

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After is whole seconds; round up so a client never retries early.
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def unsupported(param: str, why: str = "") -> ApiError:
    tail = f": {why}" if why else ""
    return ApiError(
        400,
        f"{param} is not supported by this server{tail}",
        param=param,
        code="unsupported_parameter",
    )


def from_rpc(exc: grpc.RpcError) -> ApiError:
    """The HTTP answer to a scheduler call that failed with ``exc``."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or code.name
    status, kind, err_code = _MAPPING.get(code, (500, "server_error", None))
    param = None
    if status in (400, 403):  # 403: a field the tenant may not send (priority, length_hint)
        match = _FIELD.match(details)
        param = _PARAMS.get(match.group(1)) if match else None
    elif status == 404:
        param = "model"
    retry_after = None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = _pushback_s(exc)
    return ApiError(
        status,
        f"{code.name}: {details}",
        type=kind,
        param=param,
        code=err_code,
        retry_after_s=retry_after,
    )


def _pushback_s(exc: grpc.RpcError) -> float:
    """The scheduler's retry hint in seconds (1 when it gave none)."""
    trailing: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                break
    return 1.0
