"""The Prometheus endpoint every service process serves.

Each service declares its own metrics in its ``metrics.py``; this module only
starts the HTTP endpoint they are scraped from.
"""

from __future__ import annotations

from prometheus_client import start_http_server


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serves /metrics on ``host:port``; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
