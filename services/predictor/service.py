"""gRPC shell around :class:`PredictorCore`: micro-batching and status codes.

Requests that arrive within ``batch_window_ms`` of the first waiting one (or
until ``max_batch_prompts`` prompts are waiting) are encoded in one forward
pass. The window opens only under concurrency (requests already queued, or
the previous pass served several), so a lone request is not delayed by it.
The forward runs in a one-thread executor, so the event loop keeps
accepting (and validating) requests while the encoder works; those requests
form the next batch. Bad requests are rejected before they join a batch, so
one caller's mistake never fails another caller's prediction.

Head versions (``versions.py``): a background task asks the core to re-read the
versions folder every ``versions_reload_s``; the reload runs in a thread, so
predictions continue on the versions in force until the new ones are loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1._async import HealthServicer as AioHealthServicer
from opentelemetry import trace

from services.predictor import metrics
from services.predictor.config import PredictorConfig
from services.predictor.core import (
    BadPromptsError,
    PredictorCore,
    Query,
    Result,
    UnknownHeadError,
    UnknownTargetError,
)
from shortline.common import grpc_server, prometheus, tls
from shortline.common.labels import bounded
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

log = logging.getLogger(__name__)
tracer = trace.get_tracer("shortline.predictor")

MAX_VERSION_CHARS = 128
SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name

KIND_TO_ENUM = {
    "reg": predictor_pb2.HEAD_KIND_REGRESSION,
    "cls": predictor_pb2.HEAD_KIND_CLASSIFICATION,
    "rank": predictor_pb2.HEAD_KIND_RANKING,
}
ENUM_TO_KIND = {v: k for k, v in KIND_TO_ENUM.items()}


@dataclass
class _Pending:
    query: Query
    future: asyncio.Future[Result]
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = len(self.query.prompts)


class MicroBatcher:
    """Collects queries for a short window and predicts them in one encoder pass."""

    def __init__(self, core: PredictorCore, window_ms: float, max_prompts: int) -> None:
        self.core = core
        self.window_s = max(window_ms, 0.0) / 1000.0
        self.max_prompts = max_prompts
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.last_batch_sizes: list[int] = []
        self._last_queries = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, query: Query) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(query, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        first = await self._queue.get()
        batch = [first]
        total = first.n
        # A lone caller should not pay the window: wait only when requests are
        # arriving together (others already queued, or the last pass served several).
        busy = not self._queue.empty() or self._last_queries > 1
        deadline = time.monotonic() + (self.window_s if busy else 0.0)
        while total < self.max_prompts:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get_nowait()
                    if remaining <= 0
                    else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if total + item.n > self.max_prompts:
                # Too big for this pass: it opens the next one.
                self._queue.put_nowait(item)
                break
            batch.append(item)
            total += item.n
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            self.batches += 1
            self.last_batch_sizes = [p.n for p in live]
            metrics.PREDICT_BATCH.observe(sum(self.last_batch_sizes))
            self._last_queries = len(live)
            try:
                results = await loop.run_in_executor(
                    self._executor, self.core.predict_batch, [p.query for p in live]
                )
            except Exception as exc:  # the whole pass failed: every caller hears it
                log.exception("prediction batch failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, r in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    def __init__(self, core: PredictorCore, batcher: MicroBatcher) -> None:
        self.core = core
        self.batcher = batcher

    async def Predict(
        self, request: predictor_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.PredictResponse:
        if not request.target_model:
            known = ", ".join(self.core.known_targets())
            await context.abort(grpc.StatusCode.NOT_FOUND, f"target_model is empty; known: {known}")
        head: str | None = None
        if request.head != predictor_pb2.HEAD_KIND_UNSPECIFIED:
            head = ENUM_TO_KIND.get(request.head)
            if head is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"head {request.head} is not a known HeadKind "
                    f"(use HEAD_KIND_REGRESSION, _CLASSIFICATION or _RANKING)",
                )
        query = Query(
            request.target_model,
            list(request.prompts),
            head,
            request.return_embedding,
            request.head_version[:MAX_VERSION_CHARS],
        )
        try:
            self.core.validate(query)
        except (UnknownTargetError, UnknownHeadError) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except BadPromptsError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        started = time.perf_counter()
        with tracer.start_as_current_span("predictor.predict") as span:
            span.set_attribute("shortline.target_model", request.target_model)
            span.set_attribute("shortline.prompts", len(query.prompts))
            try:
                result = await self.batcher.submit(query)
            except Exception as exc:
                # The whole pass failed (logged once, with its traceback, by the batcher):
                # not this request's doing, and the scheduler falls back on UNAVAILABLE.
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"prediction failed ({type(exc).__name__}); the encoder pass is logged",
                )
            span.set_attribute("shortline.head_version", result.head_version)
        metrics.PREDICT_SECONDS.observe(time.perf_counter() - started)
        target = bounded(request.target_model, self.core.targets)
        metrics.PREDICTED_PROMPTS.labels(target).inc(len(query.prompts))
        response = predictor_pb2.PredictResponse(
            target_model=result.target_model,
            head=KIND_TO_ENUM[result.head],
            head_version=result.head_version,
            bucket_boundaries=result.bucket_boundaries,
            quantile_levels=result.quantile_levels,
        )
        has_probs = result.probs.shape[1] > 0
        # One tolist per array, not per prompt: the quantiles cost a few us a request.
        quantiles = result.quantiles.tolist() if result.quantile_levels else None
        for i in range(len(query.prompts)):
            pred = response.predictions.add(
                predicted_tokens=float(result.tokens[i]),
                bucket=int(result.bucket[i]),
                score=float(result.score[i]),
            )
            if has_probs:
                pred.bucket_probabilities.extend(result.probs[i].tolist())
            if quantiles is not None:
                pred.quantiles.extend(quantiles[i])
            if request.return_embedding:
                pred.embedding.extend(result.embeddings[i].tolist())
        return response

    async def ListModels(
        self, request: predictor_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> predictor_pb2.ListModelsResponse:
        response = predictor_pb2.ListModelsResponse(encoder=self.core.encoder_name)
        for name in self.core.known_targets():
            route = self.core.route(name)
            if route is None:  # gone in a reload since known_targets()
                continue
            target = route.serving
            info = response.models.add(
                target_model=name,
                default_head=KIND_TO_ENUM[target.default_head],
                bucket_boundaries=target.boundaries,
                tokenizer=str(target.card.get("tokenizer", "")),
                serving_version=route.serving_version,
                canary_version=route.canary_version,
            )
            default = target.heads[target.default_head].distribution
            if default is not None:
                info.quantile_levels.extend(default.levels)
            for kind, head in sorted(target.heads.items()):
                h = info.heads.add(kind=KIND_TO_ENUM[kind], version=head.version)
                for key, value in head.metrics.items():
                    h.metrics[key] = value
        return response


class PredictorServer:
    """The running service: core + batcher + grpc.aio server with health and reflection."""

    def __init__(self, cfg: PredictorConfig, core: PredictorCore | None = None) -> None:
        self.cfg = cfg
        # Read before the encoder loads: a bad file fails in a second, naming it.
        self.tls = tls.load(cfg)
        self.core = core
        self.batcher: MicroBatcher | None = None
        self.server: grpc.aio.Server | None = None
        self._health: AioHealthServicer | None = None
        self._reloader: asyncio.Task[None] | None = None

    async def _reload_versions(self, core: PredictorCore) -> None:
        """Checks the versions folder every ``versions_reload_s`` (a stat per manifest)."""
        loop = asyncio.get_running_loop()
        interval = max(self.cfg.versions_reload_s, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(None, core.reload_versions)
            except Exception:  # a reload must never stop the serving process
                log.exception("reloading head versions failed; the versions in force stay")

    async def start(self) -> None:
        from pathlib import Path

        if self.core is None:
            loop = asyncio.get_running_loop()
            cfg = self.cfg
            self.core = await loop.run_in_executor(
                None,
                lambda: PredictorCore(
                    Path(cfg.heads_dir),
                    precision=cfg.precision,
                    threads=cfg.threads or None,
                    backend=cfg.backend,
                    versions_dir=cfg.versions_path,
                ),
            )
        core = self.core
        # The heads' small matrix products need no BLAS threads, and an idle
        # OpenBLAS worker spins after each one: measured 2-4 ms of a core per
        # request, taken from the encoder.
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        # Warm-up: the first forward pays for lazy initialisation inside torch.
        core.warm_up()
        self.batcher = MicroBatcher(core, self.cfg.batch_window_ms, self.cfg.max_batch_prompts)
        self.batcher.start()
        if core.versions_dir is not None:
            self._reloader = asyncio.get_running_loop().create_task(
                self._reload_versions(core), name="head-versions"
            )
        servicer = PredictorServicer(core, self.batcher)
        server, health = grpc_server.build_server(
            lambda s: predictor_pb2_grpc.add_PredictorServiceServicer_to_server(servicer, s),
            [SERVICE_NAME],
            self.cfg.address,
            # With --tls-ca only the CA's certificates (the scheduler's) connect.
            credentials=tls.server_credentials(self.tls, internal=True),
        )
        self.server, self._health = server, health
        await server.start()
        await grpc_server.set_serving(health, [SERVICE_NAME], True)
        log.info(
            "predictor serving on %s: %d targets (%s), backend %s, precision %s",
            self.cfg.address,
            len(core.targets),
            ", ".join(core.known_targets()),
            core.encoder.backend,
            core.encoder.precision,
        )
        log.info("TLS %s", tls.describe(self.tls))
        if core.versions_dir is not None:
            log.info(
                "head versions from %s (checked every %.1f s)",
                core.versions_dir,
                self.cfg.versions_reload_s,
            )

    async def stop(self, grace_seconds: float = 2.0) -> None:
        await self._stop_reloader()
        if self._health is not None:
            await grpc_server.set_serving(self._health, [SERVICE_NAME], False)
        if self.server is not None:
            await self.server.stop(grace_seconds)
        if self.batcher is not None:
            await self.batcher.stop()

    async def _stop_reloader(self) -> None:
        reloader, self._reloader = self._reloader, None
        if reloader is not None:
            reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader


async def serve_forever(cfg: PredictorConfig) -> None:
    from shortline.common.telemetry import setup_tracing

    setup_tracing("predictor")
    prometheus.start_metrics_server(cfg.metrics_port, cfg.host, metrics.REGISTRY)
    service = PredictorServer(cfg)
    await service.start()
    assert service.server is not None

    async def on_stop() -> None:
        if service._health is not None:
            await grpc_server.set_serving(service._health, [SERVICE_NAME], False)

    await grpc_server.run_until_signal(service.server, on_stop=on_stop)
    await service._stop_reloader()
    if service.batcher is not None:
        await service.batcher.stop()
