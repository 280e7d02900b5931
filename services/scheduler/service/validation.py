"""What is wrong with a request, naming the field (INVALID_ARGUMENT's message)."""

from __future__ import annotations

from shortline.scheduler.v1 import scheduler_pb2

MAX_REQUEST_ID = 128
MAX_TOKENS = 8192


def validate(request: scheduler_pb2.GenerateRequest) -> str | None:
    """What is wrong with a Generate request, naming the field; None when it is valid."""
    if not 1 <= len(request.request_id) <= MAX_REQUEST_ID:
        return f"request_id must be 1..{MAX_REQUEST_ID} characters, got {len(request.request_id)}"
    if not request.model:
        return "model must not be empty"
    if not request.prompt:
        return "prompt must not be empty"
    if not 1 <= request.max_tokens <= MAX_TOKENS:
        return f"max_tokens must be 1..{MAX_TOKENS}, got {request.max_tokens}"
    return None


def validate_registration(request: scheduler_pb2.RegisterWorkerRequest) -> str | None:
    """What is wrong with a RegisterWorker request; None when it is valid."""
    if not request.worker_id or not request.address:
        return "worker_id and address must not be empty"
    if request.slots < 1:
        return f"slots must be >= 1, got {request.slots}"
    return None
