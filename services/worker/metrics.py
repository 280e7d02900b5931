"""Prometheus metrics of a worker, in its own registry (``REGISTRY``), labelled by
worker id (and ``model``: only a model it serves, anything else ``other``, so no
request adds a series).

Renamed in issue 18: ``shortline_worker_slots_total`` (a gauge with a counter's
suffix, which promtool's ``check metrics`` rejects) is ``shortline_worker_slots``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shortline.common.prometheus import service_registry

REGISTRY = service_registry()

# (The Python name is kept: the servicer sets it.)
SLOTS_TOTAL = Gauge("shortline_worker_slots", "Slots of this worker", ["worker"], registry=REGISTRY)
SLOTS_USED = Gauge(
    "shortline_worker_slots_used", "Slots in use on this worker", ["worker"], registry=REGISTRY
)
WORKER_TOKENS = Counter(
    "shortline_worker_tokens_total",
    "Tokens generated through this worker",
    ["worker", "model"],
    registry=REGISTRY,
)
WORKER_STOPS = Counter(
    "shortline_worker_stops_total", "Jobs stopped early", ["worker", "reason"], registry=REGISTRY
)
