"""Triton Python-backend model with the tensor interface of Triton's vLLM backend.

Runs inside the Python-backend stub process that Triton starts for the model
(the ``model.py`` that ``repository.py`` writes only imports this class). Like the
vLLM backend, ``execute`` only enqueues requests and returns; the engine
thread answers through each request's response sender, so all requests of the
model share one decoding loop and a client that cancels its stream is noticed
(``is_cancelled``) before the next step.

Inputs (as vLLM's): ``text_input`` BYTES, ``stream`` BOOL, ``sampling_parameters``
BYTES (JSON), ``exclude_input_in_output`` BOOL, ``return_finish_reason`` BOOL,
``return_num_output_tokens`` BOOL, ``return_num_input_tokens`` BOOL; plus ``return_step_info`` BOOL,
``stream_interval_ms`` and ``stream_max_tokens`` UINT32 (ours: chunks made by
the model, ``chunking.py``; honoured only with ``return_num_output_tokens``, so
a client never miscounts a chunk as one token).
Outputs: ``text_output``, ``finish_reason``, ``num_output_tokens`` (tokens in
this response, as vLLM counts them), ``num_input_tokens`` (the prompt's tokens),
``step`` and ``batch_size`` (decoding step
of the shared loop and sequences in it, so batching can be observed).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

# Before torch (and its OpenMP runtime) loads in this stub: OpenMP threads that
# spin between parallel regions steal the core their partner needs as soon as
# the two cores are shared (Triton, the worker, other processes). Measured with
# bench.worker's smollm2 part under a load of about 4: 3-7 tokens/s with
# spinning threads against 15-37 with passive ones. Set it to ACTIVE to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from services.worker import sampling
from services.worker.triton.chunking import Chunker
from services.worker.triton.engine import ABORT, BatchEngine, Emission, Sequence

log = logging.getLogger(__name__)

# Set by the embedded server (embedded.py): the read end of a pipe that reaches end of
# file when the server is stopping (or whatever started it died).
STOP_FD_ENV = "SHORTLINE_TRITON_STOP_FD"


def _input(pb: Any, request: Any, name: str) -> Any:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return tensor.as_numpy().reshape(-1)[0]


def _bool(pb: Any, request: Any, name: str, default: bool) -> bool:
    value = _input(pb, request, name)
    return default if value is None else bool(value)


def build_backend(params: dict[str, str]) -> Any:
    """The backend named by the model config's ``engine`` parameter.

    Imported here, not at the top: each model's stub loads only its own
    backend (the replay stub never loads torch and transformers).
    """
    engine = params.get("engine", "")
    if engine == "replay":
        from services.worker.triton.replay import ReplayBackend

        return ReplayBackend(
            step_a_ms=float(params.get("step_a_ms", "20")),
            step_b_ms=float(params.get("step_b_ms", "2")),
            max_batch=int(params.get("max_batch", "256")),
        )
    if engine == "smollm2":
        from services.worker.triton.smollm2 import SmolLM2Backend

        return SmolLM2Backend(
            max_batch=int(params.get("max_batch", "16")),
            threads=int(params.get("threads", "0")),
            precision=params.get("precision", "bf16"),
        )
    raise ValueError(f"unknown engine {engine!r} in the model config parameters")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb

        self.pb = pb
        logging.basicConfig(level=logging.INFO)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_tokens_limit = int(params.get("max_tokens_limit", "4096"))
        self.engine = BatchEngine(build_backend(params), name=args["model_name"])
        self.engine.start()
        stop_fd = os.environ.get(STOP_FD_ENV)
        if stop_fd:
            threading.Thread(
                target=self._stop_at_eof, args=(int(stop_fd),), name="stop-watch", daemon=True
            ).start()

    def _stop_at_eof(self, fd: int) -> None:
        """Ends every sequence once the server is stopping. Triton unloads a model only
        when no request holds it, and a stream holds it until its final response: left
        to run, streams whose clients still read would outlast Triton's exit timeout."""
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            return
        log.info("the server is stopping: ending every sequence")
        self.engine.stop()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                self._accept(request)
            except Exception:  # one malformed request never keeps the others out
                log.exception("request %s could not be accepted", request.request_id())
        return None

    def finalize(self) -> None:
        self.engine.stop()

    def _accept(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        try:
            raw = _input(pb, request, "text_input")
            if raw is None:
                raise ValueError("text_input is required")
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            raw_params = _input(pb, request, "sampling_parameters")
            params = sampling.parse(raw_params or b"{}", self.max_tokens_limit)
            stream = _bool(pb, request, "stream", False)
            exclude_input = _bool(pb, request, "exclude_input_in_output", False)
            want_reason = _bool(pb, request, "return_finish_reason", False)
            want_count = _bool(pb, request, "return_num_output_tokens", False)
            want_input = _bool(pb, request, "return_num_input_tokens", False)
            want_step = _bool(pb, request, "return_step_info", False)
            interval_ms = _input(pb, request, "stream_interval_ms")
            chunk_tokens = _input(pb, request, "stream_max_tokens")
        except Exception as exc:  # ValueError names the field; others: a malformed tensor
            message = str(exc) if isinstance(exc, ValueError) else f"bad input: {exc!r}"[:200]
            sender.send(
                pb.InferenceResponse(error=pb.TritonError(message)),
                flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
            return
        collected: list[str] = []
        chunker = Chunker(
            interval_s=float(interval_ms or 0) / 1e3 if want_count else 0.0,
            max_tokens=int(chunk_tokens or 0) if want_count else 0,
        )

        def respond(e: Emission, text: str, tokens: int, final: bool) -> None:
            outputs = [pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
            if want_reason:
                reason = (e.finish_reason or "").encode()
                outputs.append(pb.Tensor("finish_reason", np.array([reason], dtype=np.object_)))
            if want_count:
                outputs.append(pb.Tensor("num_output_tokens", np.array([tokens], dtype=np.uint32)))
            if want_input:
                n = np.array([e.prompt_tokens], dtype=np.uint32)
                outputs.append(pb.Tensor("num_input_tokens", n))
            if want_step:
                outputs.append(pb.Tensor("step", np.array([e.step], dtype=np.uint64)))
                outputs.append(pb.Tensor("batch_size", np.array([e.batch_size], dtype=np.uint32)))
            flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            sender.send(pb.InferenceResponse(output_tensors=outputs), flags=flags)

        def emit(e: Emission) -> None:
            if e.error is not None:
                sender.send(
                    pb.InferenceResponse(error=pb.TritonError(e.error)),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            elif e.finish_reason == ABORT:
                # The client went away: close the request without a response.
                sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            elif stream:
                final = e.finish_reason is not None
                chunk = chunker.add(e.text, e.tokens, final)
                if chunk is not None:
                    respond(e, chunk[0], chunk[1], final)
            else:
                collected.append(e.text)
                if e.finish_reason is not None:
                    body = "".join(collected)
                    respond(e, body if exclude_input else text + body, e.total_tokens, True)

        self.engine.submit(
            Sequence(
                request_id=request.request_id(),
                prompt=text,
                params=params,
                emit=emit,
                is_cancelled=sender.is_cancelled,
            )
        )
