"""The OpenTelemetry resource comes from the environment, the service's name only the
default; calls that say nothing about a request are not traced."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from shortline.common.telemetry import resource, traced_call_filter

PROBE = (
    "from shortline.common.telemetry import setup_tracing;"
    "p = setup_tracing('scheduler');"
    "a = p.resource.attributes;"
    "print(a['service.name'], a.get('deployment.environment', '-'))"
)


def service_name_in_a_fresh_process(**env: str) -> list[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()


def test_otel_service_name_wins_over_the_default() -> None:
    got = service_name_in_a_fresh_process(
        OTEL_SERVICE_NAME="shortline-scheduler-eu",
        OTEL_RESOURCE_ATTRIBUTES="service.name=ignored,deployment.environment=prod",
    )
    assert got == ["shortline-scheduler-eu", "prod"]


def test_resource_attributes_name_the_service_without_otel_service_name() -> None:
    got = service_name_in_a_fresh_process(OTEL_RESOURCE_ATTRIBUTES="service.name=sched-b")
    assert got == ["sched-b", "-"]


def test_the_default_name_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert resource("worker").attributes["service.name"] == "worker"


@pytest.mark.parametrize(
    ("method", "traced"),
    [
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", False),
        ("/shortline.scheduler.v1.SchedulerInternalService/Heartbeat", False),
        ("/inference.GRPCInferenceService/ServerReady", False),
        ("/shortline.scheduler.v1.SchedulerInternalService/RegisterWorker", True),
        ("/shortline.scheduler.v1.SchedulerService/Generate", True),
        ("/inference.GRPCInferenceService/ModelStreamInfer", True),
    ],
)
def test_the_filter_drops_health_heartbeats_and_readiness(method: str, traced: bool) -> None:
    keep = traced_call_filter()
    assert keep(SimpleNamespace(method=method)) is traced
    assert keep(SimpleNamespace(method=method.encode())) is traced  # grpc.aio's clients


def test_excluded_services_from_the_environment() -> None:
    keep = traced_call_filter(("shortline.predictor.v1.PredictorService",))
    assert not keep(SimpleNamespace(method="/shortline.predictor.v1.PredictorService/Predict"))
