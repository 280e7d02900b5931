"""Prometheus metrics of the scheduler, declared once, in the scheduler's own
registry (``REGISTRY``): its endpoint exports these families and no other service's.

Histograms of latencies carry ``policy`` and ``model`` labels so one dashboard
compares schedules. Label values come from names the scheduler knows, never
straight from a request: ``model`` from the models its workers serve
(``MODELS``), ``model`` of the length metrics from the predictor's heads and
the default length model (``LENGTH_MODELS``); anything else is ``other``.
Both sets are process-wide, like the registry the series live in.

Refusals (``shortline_refused_requests_total``) are the Generate calls that end
with a status before their first message: nothing was queued for them, so
``shortline_requests_total`` (admitted requests, by how they ended) never sees
them. Their ``reason`` comes from a closed set (:data:`REFUSAL_REASONS`).
"""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.scheduler.core.accuracy import GroupAccuracy
from services.scheduler.core.admission import (
    HintNotAllowedError,
    PriorityCapError,
    TenantCapError,
)
from services.scheduler.core.interface import QueueFullError
from shortline.common.labels import OTHER, KnownNames, bounded
from shortline.common.prometheus import service_registry

REGISTRY = service_registry()
MODELS = KnownNames()
LENGTH_MODELS = KnownNames()

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

QUEUE_DEPTH = Gauge(
    "shortline_queue_depth", "Jobs waiting in the scheduler's queue", registry=REGISTRY
)
RUNNING_JOBS = Gauge("shortline_running_jobs", "Jobs running on workers", registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "shortline_queue_wait_seconds",
    "Arrival to first dispatch",
    ["policy", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TTFT = Histogram(
    "shortline_time_to_first_token_seconds",
    "Arrival to first token",
    ["policy", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMPLETION = Histogram(
    "shortline_completion_seconds",
    "Arrival to last token (job completion time)",
    ["policy", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUESTS = Counter(
    "shortline_requests_total",
    "Finished requests by outcome",
    ["model", "finish_reason"],
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "shortline_generated_tokens_total", "Tokens streamed to clients", ["model"], registry=REGISTRY
)
PREEMPTIONS = Counter(
    "shortline_preemptions_total", "Running jobs preempted for shorter ones", registry=REGISTRY
)
AGING_LATE_JOBS = Counter(
    "shortline_aging_late_jobs_total",
    "ssjf-aging: jobs that reached their latest start (arrival + JCT target - predicted service)",
    registry=REGISTRY,
)
AGING_TOKEN_TIME = Gauge(
    "shortline_aging_token_time_seconds",
    "ssjf-aging: seconds per predicted token its latest starts use (learned or configured)",
    registry=REGISTRY,
)
PREDICTOR_FALLBACKS = Counter(
    "shortline_predictor_fallbacks_total",
    "Predictions replaced by the running median because the predictor failed or was late",
    ["model"],
    registry=REGISTRY,
)
PREDICTOR_LATENCY = Histogram(
    "shortline_predictor_call_seconds",
    "Scheduler-side latency of a Predict call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
PREDICTION_ABS_ERROR = Histogram(
    "shortline_prediction_abs_error_tokens",
    "|predicted - actual| output tokens of finished requests",
    ["model"],
    buckets=(5, 10, 25, 50, 100, 200, 400, 800, 1600),
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "shortline_semantic_cache_lookups_total", "Semantic cache lookups", registry=REGISTRY
)
CACHE_HITS = Counter(
    "shortline_semantic_cache_hits_total", "Semantic cache hits", registry=REGISTRY
)
WORKERS_ALIVE = Gauge(
    "shortline_workers_alive", "Registered workers with fresh heartbeats", registry=REGISTRY
)
JOURNAL_COMMIT = Histogram(
    "shortline_journal_commit_seconds",
    "One admission-journal commit (every request's news of one event-loop turn)",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
    registry=REGISTRY,
)
JOURNAL_DELAY = Histogram(
    "shortline_journal_delay_seconds",
    "What the journal adds before text reaches clients: first change to its commit",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
    registry=REGISTRY,
)
JOURNAL_ERRORS = Counter(
    "shortline_journal_errors_total",
    "Journal commits that failed (disk full, I/O error); the requests' streams wait",
    registry=REGISTRY,
)

# Online accuracy of the length predictions (services/scheduler/core/accuracy.py): per
# target (``model``: the length model), prediction source and head, over the window of
# each target's last finished requests; recomputed every few seconds, not per request.
# A group that left the window has its series removed.
_ACCURACY = ("model", "source", "head")
PREDICTION_WINDOW = Gauge(
    "shortline_prediction_window_requests",
    "Finished requests (stop or length) in the accuracy window, by prediction source and head",
    _ACCURACY,
    registry=REGISTRY,
)
PREDICTION_TAU = Gauge(
    "shortline_prediction_kendall_tau",
    "Kendall's tau-b of predicted vs actual output tokens over the accuracy window",
    _ACCURACY,
    registry=REGISTRY,
)
PREDICTION_MAE = Gauge(
    "shortline_prediction_mae_tokens",
    "Mean |predicted - actual| output tokens over the accuracy window",
    _ACCURACY,
    registry=REGISTRY,
)
PREDICTION_BUCKET_ACCURACY = Gauge(
    "shortline_prediction_bucket_accuracy_ratio",
    "Share of the window's requests predicted in their actual length bucket "
    "(the window's p25/p50/p75/p99 of actual lengths)",
    _ACCURACY,
    registry=REGISTRY,
)
PREDICTION_ORDER_GAIN = Gauge(
    "shortline_prediction_order_gain_ratio",
    "Share of the oracle's mean-completion gain over a random order that the predictions' "
    "order captures on the accuracy window (all queued at once, one server)",
    _ACCURACY,
    registry=REGISTRY,
)
PREDICTION_REPLAYED_ORDER_GAIN = Gauge(
    "shortline_prediction_replayed_order_gain_ratio",
    "Share of the oracle's mean-JCT gain over fcfs that the scheduler's policy captures on "
    "the accuracy window replayed in the simulator (arrivals, workers, batching; the other "
    "groups ordered by their true lengths); NaN until the first replay",
    _ACCURACY,
    registry=REGISTRY,
)
_ACCURACY_GAUGES = (
    PREDICTION_WINDOW,
    PREDICTION_TAU,
    PREDICTION_MAE,
    PREDICTION_BUCKET_ACCURACY,
    PREDICTION_ORDER_GAIN,
    PREDICTION_REPLAYED_ORDER_GAIN,
)
_accuracy_series: set[tuple[str, str, str]] = set()


def export_accuracy(groups: list[GroupAccuracy]) -> None:
    """Sets the accuracy gauges to ``groups`` and removes the series of groups gone."""
    fresh = set()
    for g in groups:
        labels = (g.target, g.source, g.head)
        fresh.add(labels)
        PREDICTION_WINDOW.labels(*labels).set(g.requests)
        PREDICTION_TAU.labels(*labels).set(g.kendall_tau)
        PREDICTION_MAE.labels(*labels).set(g.mae_tokens)
        PREDICTION_BUCKET_ACCURACY.labels(*labels).set(g.bucket_accuracy)
        PREDICTION_ORDER_GAIN.labels(*labels).set(g.order_gain)
        PREDICTION_REPLAYED_ORDER_GAIN.labels(*labels).set(g.replayed_order_gain)
    for labels in _accuracy_series - fresh:
        for gauge in _ACCURACY_GAUGES:
            gauge.remove(*labels)
    _accuracy_series.clear()
    _accuracy_series.update(fresh)


# Why a Generate call was refused, by its status (RESOURCE_EXHAUSTED by its cause).
_REFUSED_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",  # no or unknown bearer token
    grpc.StatusCode.PERMISSION_DENIED: "model_not_allowed",  # the tenant may not use the model
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",  # validation: a field out of its limits
    grpc.StatusCode.ALREADY_EXISTS: "id_reused",  # the id names a different request
    grpc.StatusCode.ABORTED: "abandoned",  # a retry of a request cancelled when its client left
    grpc.StatusCode.NOT_FOUND: "model_not_served",  # no worker serves the model
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",  # shed: its deadline cannot be met
    grpc.StatusCode.UNAVAILABLE: "draining",  # the scheduler is shutting down
}
QUEUE_FULL = "queue_full"
TENANT_CAP = "tenant_cap"
PRIORITY_NOT_ALLOWED = "priority_not_allowed"  # above the tenant's max_priority
HINT_NOT_ALLOWED = "length_hint_not_allowed"  # a length_hint without length_hints
REFUSAL_REASONS = frozenset(
    {
        *_REFUSED_BY_CODE.values(),
        QUEUE_FULL,
        TENANT_CAP,
        PRIORITY_NOT_ALLOWED,
        HINT_NOT_ALLOWED,
        OTHER,
    }
)

REFUSED = Counter(
    "shortline_refused_requests_total",
    "Generate calls refused before their first message (nothing queued), by reason",
    ["reason"],
    registry=REGISTRY,
)
for _reason in sorted(REFUSAL_REASONS):
    REFUSED.labels(_reason)  # every reason exported from the start, at 0: rate() sees the first


# The refusals a status shares, told apart by the exception the abort was raised in.
_REFUSED_BY_CAUSE: dict[grpc.StatusCode, tuple[tuple[type[BaseException], str], ...]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        (QueueFullError, QUEUE_FULL),
        (TenantCapError, TENANT_CAP),
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        (PriorityCapError, PRIORITY_NOT_ALLOWED),
        (HintNotAllowedError, HINT_NOT_ALLOWED),
    ),
}


def refusal_reason(code: grpc.StatusCode | None, error: BaseException | None) -> str:
    """The reason label of a refusal with status ``code``; ``error`` is the exception the
    abort raised, whose context tells a full queue from a tenant over its share (and a
    priority or hint not granted from a model not allowed)."""
    causes = _REFUSED_BY_CAUSE.get(code, ()) if code is not None else ()
    cause = error
    while causes and cause is not None:
        for kind, reason in causes:
            if isinstance(cause, kind):
                return reason
        cause = cause.__context__
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OTHER
    by_code = _REFUSED_BY_CODE.get(code) if code is not None else None
    return bounded(by_code or OTHER, REFUSAL_REASONS)


def count_refusal(code: grpc.StatusCode | None, error: BaseException | None) -> str:
    """Counts one refused Generate call; returns its reason."""
    reason = refusal_reason(code, error)
    REFUSED.labels(reason).inc()
    return reason
