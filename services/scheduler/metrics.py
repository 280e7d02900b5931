"""Prometheus metrics of the scheduler, declared once.

Histograms of latencies carry ``policy`` and ``model`` labels so one dashboard
compares schedules. Label values come from names the scheduler knows, never
straight from a request: ``model`` from the models its workers serve
(``MODELS``), ``model`` of the length metrics from the predictor's heads and
the default length model (``LENGTH_MODELS``); anything else is ``other``.
Both sets are process-wide, like the registry the series live in.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shortline.common.labels import KnownNames

MODELS = KnownNames()
LENGTH_MODELS = KnownNames()

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

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
JOURNAL_COMMIT = Histogram(
    "shortline_journal_commit_seconds",
    "One admission-journal commit (every request's news of one event-loop turn)",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)
JOURNAL_DELAY = Histogram(
    "shortline_journal_delay_seconds",
    "What the journal adds before text reaches clients: first change to its commit",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25),
)
JOURNAL_ERRORS = Counter(
    "shortline_journal_errors_total",
    "Journal commits that failed (disk full, I/O error); the requests' streams wait",
)
