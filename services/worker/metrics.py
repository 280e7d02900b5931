"""Prometheus metrics of a worker, labelled by worker id (and ``model``: only a model
it serves, anything else ``other``, so no request adds a series)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SLOTS_TOTAL = Gauge("shortline_worker_slots_total", "Slots of this worker", ["worker"])
SLOTS_USED = Gauge("shortline_worker_slots_used", "Slots in use on this worker", ["worker"])
WORKER_TOKENS = Counter(
    "shortline_worker_tokens_total", "Tokens generated through this worker", ["worker", "model"]
)
WORKER_STOPS = Counter("shortline_worker_stops_total", "Jobs stopped early", ["worker", "reason"])
