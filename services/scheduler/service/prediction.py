"""The predictor client: one Predict call per request, falling back when it fails.

A prediction that does not come back within ``predictor_timeout_ms`` (or an
error, or no predictor configured) is ``None``; the core then uses its
:class:`~services.scheduler.core.fallback.FallbackPredictor` (the running mean
of observed lengths per model), so a request is never held up by the predictor.
In benchmark mode the predictor's tokens are divided by ``prediction_scale``
to match replayed lengths divided by it.

The client also knows which length models the predictor has heads for (its
``ListModels``, fetched at start and again every ``predictor_versions_refresh_s``):
admission refuses any other, and only those become metric labels.

Canary: ``ListModels`` also names each target's serving and canary head
versions. A ``predictor_canary_share`` of requests, chosen by a hash of the
job id (``tenant/request_id``, so a retried request gets the version it got
before), ask for the canary (``PredictRequest.head_version``); the rest ask
for nothing, which is the serving version. The predictor's answer names the
version that really answered, and the online accuracy is kept per version, so
``shortline stats`` compares the two on live traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from itertools import pairwise

import grpc

from services.scheduler import metrics
from services.scheduler.config import SchedulerConfig
from services.scheduler.core.job import Job
from shortline.common import limits, tls
from shortline.common.length_distribution import QUANTILE_LEVELS, LengthDistribution
from shortline.common.telemetry import tracer
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

log = logging.getLogger(__name__)

# gRPC's reconnect backoff grows to 120 s: a predictor that restarted (or started
# after the scheduler) would cost that long in fallback predictions.
RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
TARGETS_RETRY_S = 5.0


def canary_draw(job_id: str) -> float:
    """A uniform number in [0, 1) fixed by the job id: the same request, the same version."""
    digest = hashlib.blake2b(job_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True)
class Prediction:
    tokens: float | None  # None: fall back
    embedding: list[float] | None
    head_version: str = ""  # the predictor's head that answered (its card's version)
    # The predicted length as a distribution (from Prediction.quantiles), None: a point only.
    quantiles: LengthDistribution | None = None


def distribution_of(reply: object, p: object, scale: float) -> LengthDistribution | None:
    """The distribution of one prediction's quantiles, in the scheduler's units, or None.

    Read defensively (``getattr`` and lengths): a predictor, or generated code, from before
    ``Prediction.quantiles`` has none, a head without a calibrated distribution sends an
    empty list, and a malformed one must not fail the request (the point is used)."""
    raw = getattr(p, "quantiles", None)
    if raw is None or len(raw) == 0:
        return None
    levels = tuple(getattr(reply, "quantile_levels", ()) or QUANTILE_LEVELS)
    if len(raw) != len(levels) or not all(0.0 < a < b < 1.0 for a, b in pairwise(levels)):
        return None
    try:
        return LengthDistribution([q / scale for q in raw], levels)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


class PredictorClient:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.errors = 0
        self._tracer = tracer("shortline.scheduler")
        self._channel: grpc.aio.Channel | None = None
        self._stub: predictor_pb2_grpc.PredictorServiceAsyncStub | None = None
        if cfg.predictor:
            self._channel = tls.aio_channel(cfg.predictor, tls.load(cfg), RECONNECT)
            self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)
        if not 0.0 <= cfg.predictor_canary_share <= 1.0:
            raise ValueError(
                f"predictor_canary_share must be in [0, 1], got {cfg.predictor_canary_share}"
            )
        self._targets: frozenset[str] | None = None
        self.canaries: dict[str, str] = {}  # target -> its canary head version
        self.serving: dict[str, str] = {}  # target -> its serving head version
        self._targets_due = 0.0  # monotonic time of the next ListModels
        self._listing: asyncio.Task[None] | None = None
        metrics.LENGTH_MODELS.add([cfg.default_length_model])

    def known_targets(self) -> frozenset[str] | None:
        """Length models the predictor has heads for; None until it has said (or with
        no predictor). Asks it again in the background when the answer is old."""
        due = self._stub is not None and time.monotonic() >= self._targets_due
        if due and self._listing is None:
            self._listing = asyncio.get_running_loop().create_task(self._list_targets())
        return self._targets

    async def _list_targets(self) -> None:
        assert self._stub is not None
        try:
            reply = await self._stub.ListModels(predictor_pb2.ListModelsRequest(), timeout=5.0)
            self._targets = frozenset(m.target_model for m in reply.models)
            limit = limits.MAX_NAME_CHARS
            self.serving = {m.target_model: m.serving_version[:limit] for m in reply.models}
            self.canaries = {
                m.target_model: m.canary_version[:limit] for m in reply.models if m.canary_version
            }
            metrics.LENGTH_MODELS.add(sorted(self._targets))
            self._targets_due = time.monotonic() + max(self.cfg.predictor_versions_refresh_s, 0.1)
        except grpc.aio.AioRpcError as exc:
            log.debug("predictor ListModels failed: %s", exc.code().name)
            self._targets_due = time.monotonic() + TARGETS_RETRY_S
        finally:
            self._listing = None

    def version_for(self, job: Job) -> str:
        """The head version to ask for: the target's canary for the canary share, else ""
        (the serving version)."""
        canary = self.canaries.get(job.length_model, "")
        if canary and canary_draw(str(job.id)) < self.cfg.predictor_canary_share:
            return canary
        return ""

    async def predict(self, job: Job, *, want_embedding: bool) -> Prediction:
        predicted: float | None = None
        embedding: list[float] | None = None
        head_version = ""
        quantiles: LengthDistribution | None = None
        if self._stub is not None:
            started = time.perf_counter()
            with self._tracer.start_as_current_span("scheduler.predict") as span:
                try:
                    reply = await self._stub.Predict(
                        predictor_pb2.PredictRequest(
                            target_model=job.length_model,
                            prompts=[job.prompt],
                            return_embedding=want_embedding,
                            head_version=self.version_for(job),
                        ),
                        timeout=self.cfg.predictor_timeout_ms / 1e3,
                    )
                    p = reply.predictions[0]
                    predicted = p.predicted_tokens / self.cfg.prediction_scale
                    embedding = list(p.embedding) or None
                    head_version = reply.head_version[: limits.MAX_NAME_CHARS]
                    quantiles = distribution_of(reply, p, self.cfg.prediction_scale)
                    span.set_attribute("shortline.predicted_tokens", predicted)
                except grpc.aio.AioRpcError as exc:
                    self.errors += 1
                    span.set_attribute("shortline.predictor_error", exc.code().name)
                    log.debug("predictor failed for %s: %s", job.id, exc.code().name)
            metrics.PREDICTOR_LATENCY.observe(time.perf_counter() - started)
        if predicted is None:
            length_model = metrics.LENGTH_MODELS.label(job.length_model)
            metrics.PREDICTOR_FALLBACKS.labels(length_model).inc()
        return Prediction(predicted, embedding, head_version, quantiles)

    async def close(self) -> None:
        listing = self._listing
        if listing is not None:
            listing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listing
        if self._channel is not None:
            await self._channel.close(None)
