"""The worker's only way to Triton: ``tritonclient.grpc.aio``, one stream per request.

One stream per request because cancelling a stream cancels every request on
it. Requests use the tensor interface of Triton's vLLM backend; the optional
inputs (``return_num_output_tokens``, ``return_finish_reason``, our
``return_step_info``) are sent only when the model declares them, so a vLLM
model without them still works (tokens are then counted one per response).

A restarted Triton is found again within about a second: the channel's reconnect
backoff is bounded (``RECONNECT``; gRPC's default grows to 120 s, which kept
workers away from a Triton that was back for a minute), and a request that finds
Triton unreachable tells the worker at once (``on_unreachable``), before its
next readiness poll, so the worker stops reporting itself serving.

A stream is never cancelled once its request is over. After the final response
Triton ends the stream by itself (we half-closed it), but a cancel that lands in
between is lost in Triton's gRPC frontend (2.51): the stream's state is marked
CANCELLATION_ISSUED and waits for a response callback that never comes, so it
keeps its inference request, and with it the model, forever. Triton then cannot
unload the model on stop ("Found 1 live models and 0 in-flight", "Exit timeout
expired"). The worker cancelled every stream as its job ended, right after the
final chunk, and about a third of them lost that race. So a stream reads on to
Triton's end of the call once its request is over, and ``cancel()`` is a no-op
from then on; only a stream still running is cancelled (preemption, a client gone).

Streams use Triton's gRPC stub directly (``ModelStreamInfer``), not
tritonclient's ``stream_infer``: that wraps every response in an ``InferResult``
and each output read (``as_numpy``) builds numpy arrays, which made reading a
token cost the worker more than everything else it does with it. A stream's
request has one element per input and each response one per output, so
:func:`parse_response` reads the raw little-endian bytes itself. tritonclient
stays for the calls made once (readiness, model configuration).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import grpc
import tritonclient.grpc.aio as triton
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE as MAX_MESSAGE
from tritonclient.grpc import KeepAliveOptions, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

OPTIONAL_FLAGS = (
    "return_num_output_tokens",
    "return_num_input_tokens",  # recent vLLM backends and ours: OpenAI's usage
    "return_finish_reason",
    "return_step_info",
)
# Inputs of a model that sends its tokens in chunks when asked (ours, not vLLM's).
CHUNK_INPUTS = frozenset({"stream_interval_ms", "stream_max_tokens"})

# Reconnect attempts at most 1 s apart (first after 250 ms); a connection attempt that
# hangs (a blackholed address) is given 1 s. tritonclient's own options are kept.
RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# How long a stream whose request is over waits for Triton to end the call (it does at
# once); past that it is left to be cancelled, which only risks the leak described above.
END_WAIT_S = 2.0


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options plus the bounded reconnect backoff
    (passing ``channel_args`` replaces its defaults, so they are repeated here)."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *RECONNECT,
    ]


class TritonUnavailable(Exception):
    """Triton could not be reached; the message names the address."""


class ModelNotFound(Exception):
    pass


class TritonDeadline(Exception):
    """The stream ran past its timeout (the caller's deadline)."""


class TritonRequestError(Exception):
    """Triton or the model rejected or failed the request."""


class Chunk(NamedTuple):
    """A piece of a stream. A tuple: one is built per token read from Triton."""

    text: str
    tokens: int
    step: int
    batch_size: int
    finish_reason: str
    final: bool
    # The prompt's tokens, when the model reports them (0: not reported).
    prompt_tokens: int = 0


# Little-endian scalars of Triton's raw tensors, by datatype.
_SCALAR_FORMATS = {
    "BOOL": "<?",
    "INT8": "<b",
    "UINT8": "<B",
    "INT16": "<h",
    "UINT16": "<H",
    "INT32": "<i",
    "UINT32": "<I",
    "INT64": "<q",
    "UINT64": "<Q",
}


def _bytes_element(raw: bytes) -> bytes:
    """The first element of a raw BYTES tensor: a 4-byte little-endian length, then it."""
    if len(raw) < 4:
        return b""
    (n,) = struct.unpack_from("<I", raw)
    return raw[4 : 4 + n]


def _scalar(datatype: str, raw: bytes) -> int | None:
    fmt = _SCALAR_FORMATS.get(datatype)
    if fmt is None or len(raw) < struct.calcsize(fmt):
        return None
    return int(struct.unpack_from(fmt, raw)[0])


def parse_response(response: service_pb2.ModelInferResponse) -> Chunk:
    """One streamed response as a chunk: the first element of each output we know."""
    text = reason = ""
    count: int | None = None
    step = batch = prompt = 0
    raws = response.raw_output_contents
    for i, output in enumerate(response.outputs):
        raw = raws[i] if i < len(raws) else b""
        name = output.name
        if name == "text_output":
            text = _bytes_element(raw).decode("utf-8", "replace")
        elif name == "finish_reason":
            reason = _bytes_element(raw).decode("utf-8", "replace")
        elif name == "num_output_tokens":
            count = _scalar(output.datatype, raw)
        elif name == "num_input_tokens":
            prompt = _scalar(output.datatype, raw) or 0
        elif name == "step":
            step = _scalar(output.datatype, raw) or 0
        elif name == "batch_size":
            batch = _scalar(output.datatype, raw) or 0
    params = response.parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    return Chunk(
        text=text,
        tokens=count if count is not None else (1 if text else 0),
        step=step,
        batch_size=batch,
        finish_reason=reason,
        final=bool(final),
        prompt_tokens=prompt,
    )


def stream_request(
    model: str, request_id: str, inputs: list[tuple[str, str, bytes]]
) -> service_pb2.ModelInferRequest:
    """A one-element-per-input request; ``inputs`` are (name, datatype, raw bytes)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, datatype, raw in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(raw)
    return request


def bytes_input(name: str, value: bytes) -> tuple[str, str, bytes]:
    return name, "BYTES", struct.pack("<I", len(value)) + value


def uint32_input(name: str, value: int) -> tuple[str, str, bytes]:
    return name, "UINT32", struct.pack("<I", min(max(value, 0), 2**32 - 1))


def bool_input(name: str, value: bool) -> tuple[str, str, bytes]:
    return name, "BOOL", b"\x01" if value else b"\x00"


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        return "UNAVAILABLE" in status or "failed to connect" in str(exc).lower()
    return False


class TritonStream:
    """One request's stream; iterate for chunks (it ends after the final one), ``cancel()``
    to stop it."""

    def __init__(self, call: Any, url: str, on_unreachable: Callable[[], None]) -> None:
        self._call = call
        self._url = url
        self._on_unreachable = on_unreachable
        self.cancelled = False
        # The request is over (final response or an error): nothing left to cancel.
        self.ended = False

    def cancel(self) -> None:
        """Stops a running request; a no-op once it is over (see the module docstring)."""
        if self.ended:
            return
        self.cancelled = True
        self._call.cancel()

    async def _await_end(self) -> None:
        """Reads on until Triton ends the call, so that nothing cancels a finished request."""
        self.ended = True
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            async with asyncio.timeout(END_WAIT_S):
                async for _ in self._call:
                    pass  # nothing follows a final response

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for response in self._call:
                if response.error_message:
                    await self._await_end()  # our models' errors are final
                    message = response.error_message
                    if "unknown model" in message.lower() or "not found" in message.lower():
                        raise ModelNotFound(message)
                    raise TritonRequestError(f"Triton at {self._url}: {message}")
                chunk = parse_response(response.infer_response)
                if chunk.final:  # before the yield: a consumer may stop reading at the final chunk
                    await self._await_end()
                yield chunk
                if chunk.final:
                    return
            self.ended = True  # Triton ended the call: a cancel now would do nothing anyway
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TritonDeadline(
                    f"deadline exceeded waiting for Triton at {self._url}"
                ) from exc
            if _is_unavailable(exc):
                self._on_unreachable()
                raise TritonUnavailable(f"Triton at {self._url} is unreachable: {exc}") from exc
            raise TritonRequestError(f"Triton at {self._url}: {exc.details()}") from exc


def _nothing() -> None:
    pass


class TritonClient:
    """``on_unreachable`` runs (synchronously) whenever a request finds Triton
    unreachable: the worker's cue to stop reporting itself serving and to check
    readiness again now rather than at its next poll."""

    def __init__(self, url: str, on_unreachable: Callable[[], None] | None = None) -> None:
        self.url = url
        self.on_unreachable = on_unreachable or _nothing
        self._client = triton.InferenceServerClient(url, channel_args=channel_args())
        # Streams go over their own channel, straight to the stub (module docstring).
        self._channel = grpc.aio.insecure_channel(url, options=channel_args())
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._inputs: dict[str, set[str]] = {}

    async def close(self) -> None:
        await self._client.close()
        await self._channel.close(None)

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except (InferenceServerException, grpc.aio.AioRpcError, OSError):
            return False

    async def ready_models(self, timeout_s: float = 5.0) -> list[str]:
        """The models Triton serves now (its repository index, READY versions), sorted;
        raises TritonUnavailable when Triton does not answer.

        A model that is loading, unloading or failed to load is not served: a worker
        that registered it would take requests only to fail them."""
        try:
            index = await self._client.get_model_repository_index(client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise TritonUnavailable(f"Triton at {self.url} did not list its models: {exc}") from exc
        return sorted({m.name for m in index.models if m.state == "READY"})

    async def model_inputs(self, model: str) -> set[str]:
        """Input names the model declares (cached); raises ModelNotFound, TritonUnavailable."""
        known = self._inputs.get(model)
        if known is not None:
            return known
        try:
            config = await self._client.get_model_config(model, as_json=True, client_timeout=5.0)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if _is_unavailable(exc) or "DEADLINE" in status:
                self.on_unreachable()
                raise TritonUnavailable(f"Triton at {self.url} is unreachable: {exc}") from exc
            if "NOT_FOUND" in status or "unknown model" in str(exc).lower():
                raise ModelNotFound(
                    f"model {model!r} is not loaded on Triton at {self.url}"
                ) from exc
            raise TritonRequestError(f"Triton at {self.url}: {exc}") from exc
        inputs = {str(t["name"]) for t in config.get("config", config).get("input", [])}
        self._inputs[model] = inputs
        return inputs

    async def stream(
        self,
        model: str,
        text_input: str,
        sampling: dict[str, Any],
        *,
        request_id: str = "",
        timeout_s: float | None = None,
        headers: dict[str, str] | None = None,
        chunk_ms: float = 0.0,
        chunk_tokens: int = 0,
    ) -> TritonStream:
        """Opens one stream for one request.

        ``headers`` become gRPC metadata: the worker puts ``traceparent`` there so
        a Triton started with OpenTelemetry tracing joins the request's trace.
        ``chunk_ms``/``chunk_tokens`` ask a model that declares ``stream_interval_ms``
        (ours, ``services/worker/triton/chunking.py``) to send its tokens in chunks,
        the first at once; a model without it sends one response per token.
        """
        declared = await self.model_inputs(model)
        inputs = [
            bytes_input("text_input", text_input.encode("utf-8")),
            bool_input("stream", True),
            bytes_input("sampling_parameters", json.dumps(sampling).encode("utf-8")),
        ]
        if "exclude_input_in_output" in declared:
            inputs.append(bool_input("exclude_input_in_output", True))
        inputs.extend(bool_input(name, True) for name in OPTIONAL_FLAGS if name in declared)
        counted = "return_num_output_tokens" in declared  # a chunk's tokens are counted
        if chunk_ms > 0 and counted and declared >= CHUNK_INPUTS:
            inputs.append(uint32_input("stream_interval_ms", round(chunk_ms)))
            inputs.append(uint32_input("stream_max_tokens", max(chunk_tokens, 1)))
        # The final response carries the last token (an empty final response is not
        # asked for); Triton ends the stream after it because we half-close the stream
        # after this one request.
        request = stream_request(model, request_id, inputs)
        call = self._stub.ModelStreamInfer(
            iter((request,)), timeout=timeout_s, metadata=tuple((headers or {}).items()) or None
        )
        return TritonStream(call, self.url, lambda: self.on_unreachable())
