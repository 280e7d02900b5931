"""`shortline up` for tests: a free block of ports, the command line, waiting for it.

Shared by the tests that start the real local stack (tests/stack/, tests/security/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shortline.stack import StackConfig, all_ports, port_is_free


def stack_config(tmp: Path, **overrides: Any) -> StackConfig:
    """A config whose every port is free. Worker and metrics ports are ``base + i``
    blocks, so a random base far from the ephemeral range is tried until all are."""
    for attempt in range(50):
        base = 20000 + (os.getpid() * 7 + int(time.time() * 1000) + 97 * attempt) % 20000
        fields: dict[str, Any] = dict(
            scheduler_port=base,
            scheduler_internal_port=base + 5,
            predictor_port=base + 1,
            triton_grpc_port=base + 2,
            triton_http_port=base + 3,
            triton_metrics_port=base + 4,
            gateway_port=base + 6,
            worker_base_port=base + 10,
            metrics_base_port=base + 20,
            log_dir=str(tmp / "logs"),
        )
        fields.update(overrides)
        cfg = StackConfig(**fields)
        if all(port_is_free("127.0.0.1", p) for p in all_ports(cfg).values()):
            return cfg
    raise RuntimeError("no free port range for the stack")


def up_argv(cfg: StackConfig) -> list[str]:
    """`shortline up` with this config's ports, workers, models and log folder."""
    return [
        sys.executable, "-m", "shortline.cli", "up",
        f"--scheduler-port={cfg.scheduler_port}",
        f"--scheduler-internal-port={cfg.scheduler_internal_port}",
        f"--predictor-port={cfg.predictor_port}",
        f"--triton-grpc-port={cfg.triton_grpc_port}",
        f"--triton-http-port={cfg.triton_http_port}",
        f"--triton-metrics-port={cfg.triton_metrics_port}",
        f"--worker-base-port={cfg.worker_base_port}",
        f"--metrics-base-port={cfg.metrics_base_port}",
        f"--gateway-port={cfg.gateway_port}",
        f"--workers={cfg.workers}",
        *([f"--triton-models={cfg.triton_models}"] if cfg.triton_models else []),
        f"--log-dir={cfg.log_dir}",
    ]  # fmt: skip


def wait_until_serving(proc: subprocess.Popen[str], timeout_s: float = 300.0) -> list[str]:
    """The launcher's output up to its "Shortline is serving" line (asserted)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Shortline is serving" in line:
            break
    assert any("Shortline is serving" in line for line in lines), "".join(lines)
    return lines
