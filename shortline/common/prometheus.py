"""The Prometheus endpoint every service process serves.

Each service declares its own metrics in its ``metrics.py``; this module only
starts the HTTP endpoint they are scraped from.

The endpoint has no TLS and no authentication, so it binds the address the
service's own ``--host`` names (every service passes it; default 127.0.0.1):
metrics are never reachable from further than the service's gRPC port.
Deployments that scrape from another host set ``--host`` explicitly
(docker-compose.yml, deploy/k8s) and keep the port off public networks.
"""

from __future__ import annotations

from prometheus_client import start_http_server


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serves /metrics on ``host:port`` (pass the service's ``--host``); port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
