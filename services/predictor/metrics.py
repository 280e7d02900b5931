"""Prometheus metrics of the predictor service, in its own registry (``REGISTRY``):
its endpoint exports these families and no other service's."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shortline.common.prometheus import service_registry

REGISTRY = service_registry()

PREDICT_SECONDS = Histogram(
    "shortline_predict_seconds",
    "Predictor-side time per Predict call (queueing in the micro-batch included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
PREDICT_BATCH = Histogram(
    "shortline_predict_batch_prompts",
    "Prompts encoded per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)
# target_model: only targets with a head (the service maps others to "other").
PREDICTED_PROMPTS = Counter(
    "shortline_predicted_prompts_total",
    "Prompts predicted",
    ["target_model"],
    registry=REGISTRY,
)
