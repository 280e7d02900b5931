"""The Prometheus registry and ``/metrics`` endpoint of one service.

Each service declares its metrics in its own ``metrics.py``, in a registry of its
own (:func:`service_registry`), never in prometheus_client's global one: one
process may import several services (the ``shortline`` command imports them all,
tests run them side by side), and a process exporting the global registry would
report every service's families, most at zero (a predictor reporting
``shortline_queue_depth 0`` makes any sum over the scrape job wrong).

The endpoint has no TLS and no authentication, so it binds the address the
service's own ``--host`` names (every service passes it; default 127.0.0.1):
metrics are never reachable from further than the service's gRPC port.
Deployments that scrape from another host set ``--host`` explicitly
(docker-compose.yml, deploy/k8s) and keep the port off public networks.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)


def service_registry() -> CollectorRegistry:
    """A registry for one service's families, plus the process, platform and GC
    collectors the global registry would have given it (CPU, memory, file
    descriptors: what an operator looks at first)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def start_metrics_server(
    port: int, host: str, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread] | None:
    """Serves ``registry`` on ``host:port``/metrics (pass the service's ``--host`` and
    its own registry); port 0 disables it. Returns the server, for callers that stop it."""
    if not port:
        return None
    return start_http_server(port, addr=host, registry=registry)
