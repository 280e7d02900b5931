"""Each service's /metrics: only its own families, promtool-clean, and refusals
counted by reason for real refusals.

Predictor, scheduler (with a tokens file, a queue of 2 and a tenant share of one
job) and one worker run in this process over real gRPC sockets, each serving its
own registry on its own port as its CLI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from in_process import three_services
from tools import promtool

from shortline.common.prometheus import start_metrics_server
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow

TOKENS = {"a": "tok-a", "b": "tok-b", "c": "tok-c"}
LONG = 3000  # replay tokens: about 30 s, far longer than the test holds them


@dataclass
class Live:
    scheduler: Any
    ports: dict[str, int]
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    held: list[asyncio.Task[Any]] = field(default_factory=list)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


def families(text: str) -> set[str]:
    """Family names as exposed (a counter's with ``_total``), ``_created`` series aside."""
    return {f for f in re.findall(r"^# TYPE (\S+) ", text, re.M) if not f.endswith("_created")}


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def request(request_id: str, max_tokens: int, model: str = "replay") -> Any:
    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt="go",
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
    )


@pytest.fixture(scope="module")
async def live(
    embedded_triton: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Live]:
    from services.predictor import metrics as predictor_metrics
    from services.scheduler import metrics as scheduler_metrics
    from services.worker import metrics as worker_metrics
    from shortline.common.net import free_port

    tmp: Path = tmp_path_factory.mktemp("metrics")
    tokens = tmp / "tokens.toml"
    tokens.write_text(
        "".join(
            f'[[token]]\ntenant = "{t}"\ntoken = "{v}"\nmodels = ["replay"]\n'
            for t, v in TOKENS.items()
        )
    )
    tokens.chmod(0o600)
    async with three_services(
        embedded_triton.grpc_url,
        "metered",
        slots=1,
        tokens_file=str(tokens),
        queue_limit=2,
        tenant_queue_share=0.5,
        outcome_log=str(tmp / "outcomes.sqlite"),
    ) as services:
        scheduler = services.scheduler
        ports = {name: free_port() for name in ("scheduler", "predictor", "worker")}
        endpoints = [
            start_metrics_server(ports["scheduler"], "127.0.0.1", scheduler_metrics.REGISTRY),
            start_metrics_server(ports["predictor"], "127.0.0.1", predictor_metrics.REGISTRY),
            start_metrics_server(ports["worker"], "127.0.0.1", worker_metrics.REGISTRY),
        ]
        channel = grpc.aio.insecure_channel(scheduler.address)
        live = Live(scheduler, ports, scheduler_pb2_grpc.SchedulerServiceStub(channel))
        try:
            yield live
        finally:
            for task in live.held:
                task.cancel()
            await asyncio.gather(*live.held, return_exceptions=True)
            for endpoint in endpoints:
                if endpoint is not None:
                    endpoint[0].shutdown()
            await channel.close(None)


async def test_each_service_exports_only_its_own_families(live: Live) -> None:
    call = live.stub.Generate(request("own-1", 5), timeout=60, metadata=auth("a"))
    msgs = [m async for m in call]
    assert msgs[-1].result.actual_tokens == 5
    scraped = {name: families(scrape(port)) for name, port in live.ports.items()}
    own = {name: {f for f in fams if f.startswith("shortline_")} for name, fams in scraped.items()}
    assert "shortline_queue_depth" in own["scheduler"]
    assert "shortline_workers_alive" in own["scheduler"]
    assert "shortline_refused_requests_total" in own["scheduler"]
    assert own["predictor"] == {
        "shortline_predict_seconds",
        "shortline_predict_batch_prompts",
        "shortline_predicted_prompts_total",
    }
    assert own["worker"] == {
        "shortline_worker_slots",
        "shortline_worker_slots_used",
        "shortline_worker_tokens_total",
        "shortline_worker_stops_total",
    }
    assert not own["scheduler"] & (own["predictor"] | own["worker"])
    # Each process still says how it is doing (CPU, memory, GC).
    for fams in scraped.values():
        assert "process_cpu_seconds_total" in fams and "python_gc_collections_total" in fams


async def test_every_scrape_passes_promtool_check_metrics(live: Live) -> None:
    tool = promtool()
    for name, port in live.ports.items():
        text = scrape(port)
        done = subprocess.run(
            [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, (name, done.stdout, done.stderr)


def refused(reason: str) -> float:
    from services.scheduler.metrics import REGISTRY

    value = REGISTRY.get_sample_value("shortline_refused_requests_total", {"reason": reason})
    return value or 0.0


async def refusal(live: Live, req: Any, tenant: str | None, timeout: float = 30) -> grpc.StatusCode:
    metadata = auth(tenant) if tenant else None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in live.stub.Generate(req, timeout=timeout, metadata=metadata):
            pass
    return err.value.code()


async def hold(live: Live, request_id: str, tenant: str) -> None:
    """A long request of ``tenant`` left running (or waiting) until the module ends."""

    async def run() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in live.stub.Generate(
                request(request_id, LONG), timeout=120, metadata=auth(tenant)
            ):
                pass

    live.held.append(asyncio.create_task(run()))
    await asyncio.sleep(0.5)  # admitted and predicted


async def test_refusals_are_counted_by_reason(live: Live) -> None:
    reasons = (
        "unauthenticated",
        "invalid",
        "model_not_allowed",
        "id_reused",
        "tenant_cap",
        "queue_full",
        "priority_not_allowed",
        "length_hint_not_allowed",
        "deadline",
    )
    before = {r: refused(r) for r in reasons}
    S = grpc.StatusCode
    assert await refusal(live, request("r-auth", 5), None) == S.UNAUTHENTICATED
    assert await refusal(live, request("r-inv", 0), "a") == S.INVALID_ARGUMENT
    not_allowed = request("r-model", 5, model="smollm2-135m-instruct")
    assert await refusal(live, not_allowed, "a") == S.PERMISSION_DENIED
    too_high = request("r-prio", 5)
    too_high.priority = 1  # above tenant a's max_priority (absent: 0)
    assert await refusal(live, too_high, "a") == S.PERMISSION_DENIED
    hinted = request("r-hint", 5)
    hinted.length_hint = 1  # tenant a has no length_hints
    assert await refusal(live, hinted, "a") == S.PERMISSION_DENIED
    await hold(live, "long-a1", "a")  # runs on the one slot
    await hold(live, "long-a2", "a")  # waits: tenant a's one share of the queue
    assert await refusal(live, request("long-a2", 7), "a") == S.ALREADY_EXISTS
    assert await refusal(live, request("r-cap", 5), "a") == S.RESOURCE_EXHAUSTED
    await hold(live, "long-b1", "b")  # waits: the queue (2) is full
    assert await refusal(live, request("r-full", 5), "c") == S.RESOURCE_EXHAUSTED
    assert live.scheduler.plane.core.queue_depth == 2
    # An admitted request that was accepted and then failed is no refusal: none here.
    after = {r: refused(r) for r in reasons}
    counted = {r: after[r] - before[r] for r in reasons if r != "deadline"}
    assert counted == {r: 1.0 for r in reasons if r != "deadline"}, counted
    text = scrape(live.ports["scheduler"])
    assert 'shortline_refused_requests_total{reason="queue_full"}' in text
