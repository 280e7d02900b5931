"""The predictor client: one Predict call per request, falling back when it fails.

A prediction that does not come back within ``predictor_timeout_ms`` (or an
error, or no predictor configured) is ``None``; the core then uses its
:class:`~services.scheduler.core.fallback.FallbackPredictor` (the running mean
of observed lengths per model), so a request is never held up by the predictor.
In benchmark mode the predictor's tokens are divided by ``prediction_scale``
to match replayed lengths divided by it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.core.job import Job
from shortline.common.telemetry import tracer
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    tokens: float | None  # None: fall back
    embedding: list[float] | None


class PredictorClient:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.errors = 0
        self._tracer = tracer("shortline.scheduler")
        self._channel: grpc.aio.Channel | None = None
        self._stub: predictor_pb2_grpc.PredictorServiceAsyncStub | None = None
        if cfg.predictor:
            self._channel = grpc.aio.insecure_channel(cfg.predictor)
            self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)

    async def predict(self, job: Job, *, want_embedding: bool) -> Prediction:
        predicted: float | None = None
        embedding: list[float] | None = None
        if self._stub is not None:
            started = time.perf_counter()
            with self._tracer.start_as_current_span("scheduler.predict") as span:
                try:
                    reply = await self._stub.Predict(
                        predictor_pb2.PredictRequest(
                            target_model=job.length_model,
                            prompts=[job.prompt],
                            return_embedding=want_embedding,
                        ),
                        timeout=self.cfg.predictor_timeout_ms / 1e3,
                    )
                    p = reply.predictions[0]
                    predicted = p.predicted_tokens / self.cfg.prediction_scale
                    embedding = list(p.embedding) or None
                    span.set_attribute("shortline.predicted_tokens", predicted)
                except grpc.aio.AioRpcError as exc:
                    self.errors += 1
                    span.set_attribute("shortline.predictor_error", exc.code().name)
                    log.debug("predictor failed for %s: %s", job.id, exc.code().name)
            metrics.PREDICTOR_LATENCY.observe(time.perf_counter() - started)
        if predicted is None:
            metrics.PREDICTOR_FALLBACKS.labels(job.length_model).inc()
        return Prediction(predicted, embedding)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
