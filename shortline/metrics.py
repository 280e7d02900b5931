"""Prometheus metrics of every service, declared once.

Each service process starts an HTTP endpoint with :func:`start_metrics_server`
and updates the metrics below. Histograms of latencies carry ``policy`` and
``model`` labels so one dashboard compares schedules.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# Scheduler
QUEUE_DEPTH = Gauge("shortline_queue_depth", "Jobs waiting in the scheduler's queue")
RUNNING_JOBS = Gauge("shortline_running_jobs", "Jobs running on workers")
QUEUE_WAIT = Histogram(
    "shortline_queue_wait_seconds",
    "Arrival to first dispatch",
    ["policy", "model"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "shortline_time_to_first_token_seconds",
    "Arrival to first token",
    ["policy", "model"],
    buckets=LATENCY_BUCKETS,
)
COMPLETION = Histogram(
    "shortline_completion_seconds",
    "Arrival to last token (job completion time)",
    ["policy", "model"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "shortline_requests_total", "Finished requests by outcome", ["model", "finish_reason"]
)
GENERATED_TOKENS = Counter(
    "shortline_generated_tokens_total", "Tokens streamed to clients", ["model"]
)
PREEMPTIONS = Counter("shortline_preemptions_total", "Running jobs preempted for shorter ones")
AGING_LATE_JOBS = Counter(
    "shortline_aging_late_jobs_total",
    "ssjf-aging: jobs that reached their latest start (arrival + JCT target - predicted service)",
)
AGING_TOKEN_TIME = Gauge(
    "shortline_aging_token_time_seconds",
    "ssjf-aging: seconds per predicted token its latest starts use (learned or configured)",
)
PREDICTOR_FALLBACKS = Counter(
    "shortline_predictor_fallbacks_total",
    "Predictions replaced by the running median because the predictor failed or was late",
    ["model"],
)
PREDICTOR_LATENCY = Histogram(
    "shortline_predictor_call_seconds",
    "Scheduler-side latency of a Predict call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
PREDICTION_ABS_ERROR = Histogram(
    "shortline_prediction_abs_error_tokens",
    "|predicted - actual| output tokens of finished requests",
    ["model"],
    buckets=(5, 10, 25, 50, 100, 200, 400, 800, 1600),
)
CACHE_LOOKUPS = Counter("shortline_semantic_cache_lookups_total", "Semantic cache lookups")
CACHE_HITS = Counter("shortline_semantic_cache_hits_total", "Semantic cache hits")
WORKERS_ALIVE = Gauge("shortline_workers_alive", "Registered workers with fresh heartbeats")

# Worker
SLOTS_TOTAL = Gauge("shortline_worker_slots_total", "Slots of this worker", ["worker"])
SLOTS_USED = Gauge("shortline_worker_slots_used", "Slots in use on this worker", ["worker"])
WORKER_TOKENS = Counter(
    "shortline_worker_tokens_total", "Tokens generated through this worker", ["worker", "model"]
)
WORKER_STOPS = Counter("shortline_worker_stops_total", "Jobs stopped early", ["worker", "reason"])

# Predictor
PREDICT_SECONDS = Histogram(
    "shortline_predict_seconds",
    "Predictor-side time per Predict call (queueing in the micro-batch included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
PREDICT_BATCH = Histogram(
    "shortline_predict_batch_prompts",
    "Prompts encoded per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PREDICTED_PROMPTS = Counter(
    "shortline_predicted_prompts_total", "Prompts predicted", ["target_model"]
)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serves /metrics on ``host:port``; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
