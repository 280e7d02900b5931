"""The WorkerService: K slots in front of one Triton endpoint.

``Execute`` streams a job's text as Triton produces it, or, when its request
names the scheduler's open ``StreamDeltas`` stream (``deltas.py``), puts the
deltas there, batched with other jobs', and ends with the result alone, which
counts them. ``Cancel`` and ``Preempt`` cancel the job's Triton stream
(the model drops the sequence before its next decoding step) and return
exactly the text the Execute stream has handed to gRPC (or put on the delta
stream): the Execute loop appends a delta to the job's ``Execution``
(``slots.py``) and sends it without an ``await`` in between, and it checks the
stop flag before taking the next delta, so the two can never disagree. Every
exit path of Execute (end, cancel, preempt, client gone, deadline, error)
releases the slot in one ``finally``.

The server around it (gRPC, Triton health watch, scheduler membership) is
in ``server.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import propagate, trace

from services.worker import metrics
from services.worker import sampling as sampling_mod
from services.worker.config import WorkerConfig
from services.worker.prompts import (
    ModelSpec,
    format_messages,
    format_prompt,
    model_limits,
    parse_models,
)
from services.worker.service.coalesce import chunks
from services.worker.service.deltas import DeltaStreams, StreamLimit
from services.worker.service.slots import DuplicateJob, Execution, Slots, SlotsFull
from services.worker.service.triton_client import (
    ModelNotFound,
    TritonClient,
    TritonDeadline,
    TritonRequestError,
    TritonUnavailable,
)
from shortline.common import tls
from shortline.common.labels import bounded
from shortline.common.telemetry import tracer
from shortline.common.v1 import common_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

MAX_JOB_ID = 128

_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_CANCELLED,
}


def sampling_dict(request: worker_pb2.ExecuteRequest, max_tokens_limit: int) -> dict[str, Any]:
    """vLLM ``sampling_parameters`` for the request; raises ValueError naming the field."""
    s = request.sampling
    params = sampling_mod.SamplingParams(
        max_tokens=request.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else -1,
        ignore_eos=s.ignore_eos,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
    )
    sampling_mod.validate(params, max_tokens_limit)
    out: dict[str, Any] = {"max_tokens": request.max_tokens, "ignore_eos": s.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        if s.HasField(name):
            out[name] = getattr(s, name)
    if s.stop:
        out["stop"] = list(s.stop)
    return out


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, config: WorkerConfig, triton: TritonClient, worker_id: str) -> None:
        self.config = config
        self.triton = triton
        self.worker_id = worker_id
        self.models: dict[str, ModelSpec] = parse_models(config.models)
        self.limits = model_limits(self.models, config.max_prompt_chars)
        self.slots = Slots(config.slots)
        metrics.SLOTS_TOTAL.labels(worker_id).set(config.slots)
        self._slots_used = metrics.SLOTS_USED.labels(worker_id)
        self._tokens = metrics.WORKER_TOKENS
        self.serving = False
        # The schedulers' StreamDeltas streams (deltas.py).
        self.deltas = DeltaStreams()
        self._tracer = tracer("shortline.worker")
        # With mutual TLS only these certificates may run, stop or inspect jobs: a job id
        # alone (guessable) must not let anyone cancel another user's request.
        self.callers = tls.parse_names(config.scheduler_identity) if config.mutual_tls else None

    async def _check_caller(self, context: grpc.aio.ServicerContext) -> None:
        if self.callers is None:
            return
        denied = tls.caller_allowed(context, self.callers)
        if denied is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, denied)

    def _validate(
        self, request: worker_pb2.ExecuteRequest
    ) -> tuple[ModelSpec, dict[str, Any], str]:
        """The model, Triton's sampling parameters and the text to continue; KeyError for
        a model not served, ValueError (INVALID_ARGUMENT) naming what is wrong."""
        if not 1 <= len(request.job_id) <= MAX_JOB_ID:
            raise ValueError(
                f"job_id must be 1..{MAX_JOB_ID} characters, got {len(request.job_id)}"
            )
        spec = self.models.get(request.model)
        if spec is None:
            raise KeyError(request.model)
        if request.messages and request.prompt:
            raise ValueError("exactly one of prompt and messages must be set, got both")
        if request.messages:
            turns = [(m.role, m.content) for m in request.messages]
            # ChatRefused (a ValueError): raw format, unknown role.
            text = format_messages(spec.prompt_format, turns, request.resume_text, spec.name)
            what = "messages in the chat template"
        else:
            text = format_prompt(spec.prompt_format, request.prompt, request.resume_text)
            what = "prompt"
        # The limit holds for the raw prompt (as before) and, for messages, the whole
        # formatted conversation: what the model reads.
        chars = len(text) if request.messages else len(request.prompt) + len(request.resume_text)
        if chars > self.config.max_prompt_chars:
            raise ValueError(
                f"{what} plus resume_text must be at most {self.config.max_prompt_chars} "
                f"characters (max_prompt_chars), got {chars}"
            )
        return spec, sampling_dict(request, spec.max_tokens), text

    async def Execute(
        self, request: worker_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.ExecuteResponse]:
        started = time.perf_counter()
        await self._check_caller(context)
        try:
            spec, params, text_input = self._validate(request)
        except KeyError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served by this worker "
                f"(models: {', '.join(sorted(self.models))})",
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.serving:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"Triton at {self.triton.url} is unreachable"
            )
        try:
            execution = self.slots.acquire(request.job_id, request.model)
        except SlotsFull:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"all {self.slots.total} slots of worker {self.worker_id} are busy",
            )
        except DuplicateJob:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"job {request.job_id!r} is already running here"
            )
        self._slots_used.set(self.slots.used)
        outcome = "error"
        with self._tracer.start_as_current_span("worker.execute") as span:
            span.set_attribute("shortline.job_id", request.job_id)
            span.set_attribute("shortline.model", request.model)
            span.set_attribute("shortline.resume_tokens", request.resume_tokens)
            try:
                async for response in self._run(
                    execution, spec, params, text_input, request, context, started
                ):
                    yield response
                span.set_attribute("shortline.actual_tokens", execution.tokens)
                outcome = "finished"
            except asyncio.CancelledError:
                outcome = "client_gone"  # disconnect or deadline
                if not context.cancelled():
                    raise
                # The RPC is over; returning spares grpc an "unhandled" error log.
            finally:
                if execution.stream is not None and not execution.stream.cancelled:
                    execution.stream.cancel()
                self.slots.release(execution)
                self._slots_used.set(self.slots.used)
                model = bounded(request.model, self.models)
                self._tokens.labels(self.worker_id, model).inc(execution.tokens)
                if execution.stop_reason == common_pb2.FINISH_REASON_CANCELLED:
                    outcome = "cancelled"
                elif execution.stop_reason == common_pb2.FINISH_REASON_PREEMPTED:
                    outcome = "preempted"
                if outcome != "finished":
                    metrics.WORKER_STOPS.labels(self.worker_id, outcome).inc()

    async def _run(
        self,
        execution: Execution,
        spec: ModelSpec,
        params: dict[str, Any],
        text_input: str,
        request: worker_pb2.ExecuteRequest,
        context: grpc.aio.ServicerContext,
        started: float,
    ) -> AsyncIterator[worker_pb2.ExecuteResponse]:
        remaining = context.time_remaining()
        timeout = min(remaining, self.config.triton_timeout_s) if remaining else None
        first_token = 0.0
        reason = ""
        streamed = 0  # deltas put on the StreamDeltas stream
        stream_id = ""
        # Not made current: the span outlives many yields of this generator.
        span = self._tracer.start_span("triton.stream_infer")
        span.set_attribute("triton.url", self.triton.url)
        span.set_attribute("triton.model", request.model)
        trace_headers: dict[str, str] = {}
        propagate.inject(trace_headers, context=trace.set_span_in_context(span))
        try:
            execution.stream = await self.triton.stream(
                request.model,
                text_input,
                params,
                request_id=request.job_id,
                timeout_s=timeout,
                headers=trace_headers,
                # The same rule at the source, where the model can chunk: one response
                # read per chunk instead of per token (chunking.py).
                chunk_ms=self.config.coalesce_ms,
                chunk_tokens=self.config.coalesce_tokens,
            )
            if execution.stop_reason is not None:  # stopped while the stream was being opened
                execution.stream.cancel()
            sent = 0
            # Decided once per run: each of its deltas on the one stream or the other.
            stream_id = request.delta_stream if self.deltas.has(request.delta_stream) else ""
            coalesce_s = self.config.coalesce_ms / 1e3
            async for chunk in chunks(
                execution.stream, execution, coalesce_s, self.config.coalesce_tokens
            ):
                if chunk.tokens or chunk.text:
                    if not first_token:
                        first_token = time.perf_counter() - started
                    sent += chunk.tokens
                    delta = worker_pb2.TextDelta(
                        text=chunk.text,
                        tokens=chunk.tokens,
                        total_tokens=sent,
                        step=chunk.step,
                        batch_size=chunk.batch_size,
                    )
                    if stream_id:
                        # Counted even if the stream closed meanwhile: its scheduler
                        # then waits for deltas that never come and resumes the job.
                        # A job's first goes at once: time to first token unchanged.
                        self.deltas.put(stream_id, request.job_id, delta, streamed == 0)
                        streamed += 1
                    else:
                        yield worker_pb2.ExecuteResponse(delta=delta)
                if chunk.finish_reason:
                    reason = chunk.finish_reason
        except asyncio.CancelledError:
            task = asyncio.current_task()
            # Our own Cancel/Preempt cancelled the Triton call: finish normally. If
            # the handler itself is being cancelled (client gone, deadline), re-raise.
            if execution.stop_reason is None or (task is not None and task.cancelling()):
                raise
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except TritonUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TritonDeadline as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except TritonRequestError as exc:
            # Not INTERNAL: the request was valid as far as the worker can tell, so
            # the scheduler should try it elsewhere (Triton unloading a model on stop,
            # a backend error); only Triton's validation messages mean the input.
            code = grpc.StatusCode.UNAVAILABLE
            if "must be" in str(exc):
                code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        finally:
            span.set_attribute("shortline.tokens", execution.tokens)
            span.set_attribute("shortline.finish_reason", reason or str(execution.stop_reason))
            span.end()
        if streamed:
            self.deltas.flush(stream_id)  # its scheduler waits for them to end the run
        finish: common_pb2.FinishReason.ValueType
        if execution.stop_reason is not None:
            finish = common_pb2.FinishReason.ValueType(execution.stop_reason)
        elif reason in _REASONS:
            finish = _REASONS[reason]
        else:
            length = execution.tokens >= request.max_tokens
            finish = common_pb2.FINISH_REASON_LENGTH if length else common_pb2.FINISH_REASON_STOP
        yield worker_pb2.ExecuteResponse(
            result=worker_pb2.ExecuteResult(
                finish_reason=finish,
                tokens=execution.tokens,
                first_token_seconds=first_token,
                total_seconds=time.perf_counter() - started,
                worker_id=self.worker_id,
                prompt_tokens=execution.prompt_tokens,
                streamed_deltas=streamed,
            )
        )

    async def _stop(
        self, job_id: str, reason: int, context: grpc.aio.ServicerContext
    ) -> tuple[str, int]:
        await self._check_caller(context)
        execution = self.slots.get(job_id)
        if execution is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {job_id!r} is not running here")
        assert execution is not None
        if execution.stop_reason is None:
            execution.stop_reason = reason
            if execution.stream is not None:
                execution.stream.cancel()
        # No await since the flag was set: this is exactly what Execute streamed.
        text, tokens = execution.text, execution.tokens
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(execution.done.wait(), 5.0)
        return text, tokens

    async def Cancel(
        self, request: worker_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CancelResponse:
        text, tokens = await self._stop(request.job_id, common_pb2.FINISH_REASON_CANCELLED, context)
        return worker_pb2.CancelResponse(job_id=request.job_id, text=text, tokens=tokens)

    async def Preempt(
        self, request: worker_pb2.PreemptRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PreemptResponse:
        text, tokens = await self._stop(request.job_id, common_pb2.FINISH_REASON_PREEMPTED, context)
        return worker_pb2.PreemptResponse(job_id=request.job_id, text=text, tokens=tokens)

    async def StreamDeltas(
        self, request: worker_pb2.StreamDeltasRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StreamDeltasResponse]:
        await self._check_caller(context)
        try:
            async for message in self.deltas.serve(request.stream_id):
                yield message
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StreamLimit as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except asyncio.CancelledError:
            if not context.cancelled():
                raise
            # The scheduler went away; returning spares grpc an "unhandled" error log.

    async def GetCapacity(
        self, request: worker_pb2.GetCapacityRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetCapacityResponse:
        await self._check_caller(context)
        return worker_pb2.GetCapacityResponse(
            worker_id=self.worker_id,
            slots_total=self.slots.total,
            slots_used=self.slots.used,
            models=sorted(self.models),
            serving=self.serving,
            triton_url=self.triton.url,
        )
