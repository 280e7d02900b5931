"""Fuzzing every RPC of running services with raw bytes, counting the statuses.

Given the services' addresses (``{"scheduler": "127.0.0.1:50051", ...}``),
:func:`discover` asks each server's reflection which services it serves
(health and reflection included) and finds their request types in the
protobuf pool, so an RPC added later is fuzzed without a change here.
:func:`plan` draws the cases with hypothesis (``messages.request_cases``):
``@given`` runs with ``max_examples`` equal to the RPC's share of ``n`` and a
fixed ``@seed``, and its body only collects what it is given (hypothesis is
the generator; the calls go out afterwards, concurrently, which one
``@given`` example at a time could not do). :func:`send_all` puts each case
on the wire as-is (``channel.unary_unary`` and friends without serializers)
and counts the final status per RPC; :func:`normal_requests` then checks
that every service still serves an ordinary request.

A status is *defined* unless it is ``UNKNOWN`` or ``INTERNAL``: those say the
server did not know what happened, which for a fuzzed input means an
unhandled exception.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor as d
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.faults.messages import Hints, request_cases
from shortline.common.v1 import common_pb2
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from shortline.scheduler.v1 import internal_pb2, scheduler_pb2, scheduler_pb2_grpc
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

# The generated modules above put every request type in the default pool.
_MODULES = (internal_pb2, predictor_pb2, worker_pb2, health_pb2, reflection_pb2)
UNDEFINED = frozenset({"UNKNOWN", "INTERNAL"})
# A call that has not ended this long after its deadline is hung.
HANG_SLACK_S = 10.0
DISTINCT_DETAILS = 6


@dataclass(frozen=True)
class Rpc:
    label: str  # which server ("scheduler", "internal", "worker", "predictor")
    address: str
    method: d.MethodDescriptor

    @property
    def name(self) -> str:
        return f"{self.label}:{self.method.containing_service.name}/{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


@dataclass
class Tally:
    """What the fuzzed calls answered."""

    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    answered: int = 0
    hung: int = 0
    harness_errors: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    # The first distinct messages of each status per RPC: do they name what is wrong?
    details: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def undefined(self) -> int:
        return sum(c[s] for c in self.statuses.values() for s in UNDEFINED)

    def add(self, rpc: Rpc, kind: str, payload: bytes, code: str, details: str) -> None:
        self.statuses.setdefault(rpc.name, Counter())[code] += 1
        seen = self.details.setdefault(rpc.name, {}).setdefault(code, [])
        shape = re.sub(r"\d+", "N", details[:160])  # "its 3 bytes" and "its 9 bytes" are one
        if len(seen) < DISTINCT_DETAILS and shape not in seen:
            seen.append(shape)
        if code in UNDEFINED and len(self.examples) < 20:
            self.examples.append(
                {
                    "rpc": rpc.name,
                    "kind": kind,
                    "status": code,
                    "details": details[:300],
                    "bytes": len(payload),
                    "head_hex": payload[:64].hex(),
                }
            )


async def discover(targets: Mapping[str, str]) -> list[Rpc]:
    """Every method of every service each server lists through reflection."""
    pool = descriptor_pool.Default()
    rpcs: list[Rpc] = []
    for label, address in targets.items():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
                for service in response.list_services_response.service:
                    found = pool.FindServiceByName(service.name)  # KeyError: not importable
                    rpcs.extend(Rpc(label, address, m) for m in found.methods)
    return rpcs


def _draw(strategy: st.SearchStrategy[Any], count: int, seed_value: int) -> list[Any]:
    """``count`` examples of ``strategy``, the same ones for the same seed."""
    out: list[Any] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @seed(seed_value)
    @given(strategy)
    def collect(case: Any) -> None:
        out.append(case)

    collect()
    # A small space (an empty message type) runs out of distinct examples: repeat them.
    return [out[i % len(out)] for i in range(count)] if out else []


def plan(
    rpcs: list[Rpc],
    n: int,
    hints: Hints,
    templates: Mapping[str, Message] | None = None,
    seed_value: int = 16,
) -> list[tuple[Rpc, str, bytes]]:
    """``n`` cases spread evenly over ``rpcs`` (each at least one); ``templates`` maps a
    request type's full name to a request the service serves (``edge`` cases)."""
    cases: list[tuple[Rpc, str, bytes]] = []
    share, extra = divmod(n, len(rpcs))
    templates = templates or {}
    for i, rpc in enumerate(rpcs):
        count = max(1, share + (1 if i < extra else 0))
        input_type = rpc.method.input_type
        kinds = request_cases(input_type, hints, templates.get(input_type.full_name))
        # Kinds in equal parts (hypothesis' own one_of favours some branches heavily);
        # with a template, edge cases get two parts: most code lies past the first check.
        parts = [*kinds, "edge"] if "edge" in kinds else list(kinds)
        wanted: Counter[str] = Counter()
        q, r = divmod(count, len(parts))
        for j, kind in enumerate(parts):
            wanted[kind] += q + (1 if j < r else 0)
        for j, kind in enumerate(kinds):
            if wanted[kind]:
                drawn = _draw(kinds[kind], wanted[kind], seed_value + 97 * i + j)
                cases.extend((rpc, kind, data) for data in drawn)
    return cases


def _timeout(rpc: Rpc, timeout_s: float) -> float:
    # Watch streams until the deadline by design: a short one keeps the run short.
    return min(timeout_s, 0.3) if rpc.method.name == "Watch" else timeout_s


async def _call(channel: grpc.aio.Channel, rpc: Rpc, payload: bytes, timeout: float) -> None:
    # No serializers: the bytes go on the wire as they are, and come back as bytes.
    m, path = rpc.method, rpc.path
    if m.client_streaming and m.server_streaming:
        stream = channel.stream_stream(path, None, None)(iter([payload]), timeout=timeout)
        async for _ in stream:
            pass
    elif m.client_streaming:
        await channel.stream_unary(path, None, None)(iter([payload]), timeout=timeout)
    elif m.server_streaming:
        async for _ in channel.unary_stream(path, None, None)(payload, timeout=timeout):
            pass
    else:
        await channel.unary_unary(path, None, None)(payload, timeout=timeout)


async def send_all(
    cases: list[tuple[Rpc, str, bytes]], *, concurrency: int = 16, timeout_s: float = 3.0
) -> Tally:
    """Sends every case on one channel per server; counts each call's final status."""
    tally = Tally()
    channels = {rpc.address: grpc.aio.insecure_channel(rpc.address) for rpc, _, _ in cases}
    gate = asyncio.Semaphore(concurrency)

    async def one(rpc: Rpc, kind: str, payload: bytes) -> None:
        timeout = _timeout(rpc, timeout_s)
        async with gate:
            tally.sent += 1
            tally.kinds[kind] += 1
            try:
                call = _call(channels[rpc.address], rpc, payload, timeout)
                await asyncio.wait_for(call, timeout + HANG_SLACK_S)
                code, details = "OK", ""
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            except TimeoutError:
                tally.hung += 1
                return
            except Exception as exc:
                tally.harness_errors += 1
                logging.getLogger(__name__).warning("%s: %s", rpc.name, exc)
                return
            tally.answered += 1
            tally.add(rpc, kind, payload, code, details)

    try:
        await asyncio.gather(*(one(*case) for case in cases))
    finally:
        for channel in channels.values():
            await channel.close(None)
    return tally


async def normal_requests(targets: Mapping[str, str], model: str = "replay") -> list[str]:
    """What fails among ordinary requests to each server (empty: all served)."""
    problems: list[str] = []
    for label, address in targets.items():
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                if health.status != health_pb2.HealthCheckResponse.SERVING:
                    problems.append(f"{label}: health {health.status}")
                await _normal(label, channel, model)
            except grpc.aio.AioRpcError as exc:
                problems.append(f"{label}: {exc.code().name} {exc.details()}")
            except AssertionError as exc:
                problems.append(f"{label}: {exc}")
    return problems


async def _normal(label: str, channel: grpc.aio.Channel, model: str) -> None:
    if label == "scheduler":
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        request = scheduler_pb2.GenerateRequest(
            request_id=f"after-fuzz-{uuid.uuid4().hex[:8]}",
            model=model,
            prompt="after the fuzz",
            max_tokens=4,
            sampling=common_pb2.SamplingParams(ignore_eos=True),
        )
        responses = [r async for r in stub.Generate(request, timeout=20)]
        last = responses[-1] if responses else None
        assert last is not None and last.HasField("result"), f"Generate ended with {last}"
        assert last.result.actual_tokens == 4, f"Generate gave {last.result.actual_tokens}"
    elif label == "internal":
        from shortline.scheduler.v1 import internal_pb2_grpc

        stats = await internal_pb2_grpc.SchedulerInternalServiceStub(channel).GetStats(
            scheduler_pb2.GetStatsRequest(), timeout=5
        )
        assert stats.workers, "no worker registered"
    elif label == "worker":
        capacity = await worker_pb2_grpc.WorkerServiceStub(channel).GetCapacity(
            worker_pb2.GetCapacityRequest(), timeout=5
        )
        assert capacity.serving, "worker not serving"
    elif label == "predictor":
        predictor = predictor_pb2_grpc.PredictorServiceStub(channel)
        models = await predictor.ListModels(predictor_pb2.ListModelsRequest(), timeout=5)
        target = models.models[0].target_model
        answer = await predictor.Predict(
            predictor_pb2.PredictRequest(target_model=target, prompts=["hello"]), timeout=10
        )
        assert len(answer.predictions) == 1, "Predict gave no prediction"


async def recover(
    targets: Mapping[str, str], within_s: float = 60.0
) -> tuple[float, list[str], list[str]]:
    """Seconds until every server serves an ordinary request again, what still fails
    then (empty when all recovered), and what failed first (why recovery took time)."""
    started = time.perf_counter()
    first: list[str] = []
    while True:
        problems = await normal_requests(targets)
        first = first or problems
        elapsed = time.perf_counter() - started
        if not problems or elapsed > within_s:
            return elapsed, problems, first
        await asyncio.sleep(0.2)


class LogWatch(logging.Handler):
    """Counts the log lines of a run (installed on the root logger): warnings and
    errors per logger, and records that carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: Counter[str] = Counter()
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines[record.name] += 1
        message = record.getMessage()
        if record.exc_info or "Traceback" in message or "\n" in message:
            self.tracebacks.append(f"{record.name}: {message[:200]}")

    def __enter__(self) -> LogWatch:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


def table_rows(tally: Tally) -> Iterator[tuple[str, int, str]]:
    """(rpc, calls, statuses) for printing, RPCs in name order."""
    for name in sorted(tally.statuses):
        counts = tally.statuses[name]
        text = ", ".join(f"{code} {n}" for code, n in counts.most_common())
        yield name, sum(counts.values()), text


async def run(
    targets: Mapping[str, str],
    n: int,
    hints: Hints,
    templates: Mapping[str, Message] | None = None,
    *,
    seed_value: int = 16,
    concurrency: int = 16,
    timeout_s: float = 3.0,
) -> dict[str, Any]:
    """The fuzz scenario's figures against running services (``targets``).

    ``accepted`` counts the messages sent, ``completed`` those answered with a
    status, ``lost`` those the harness could not send, ``hung`` those still
    open long after their deadline; gaps, repeats and spliced text do not
    apply (None). ``seconds_to_recover``: from the last answer until every
    server serves an ordinary request again."""
    rpcs = await discover(targets)
    # Generation takes seconds: in a thread, so the services' heartbeats go on.
    cases = await asyncio.to_thread(plan, rpcs, n, hints, templates, seed_value)
    # Interleaved: every service under fuzz at once, as a real flood would be.
    random.Random(seed_value).shuffle(cases)
    with LogWatch() as logs:
        started = time.perf_counter()
        tally = await send_all(cases, concurrency=concurrency, timeout_s=timeout_s)
        fuzz_s = time.perf_counter() - started
        recover_s, problems, first = await recover(targets)
    return {
        "name": "fuzz",
        "accepted": tally.sent,
        "completed": tally.answered,
        "lost": tally.harness_errors,
        "hung": tally.hung,
        "gaps": None,
        "repeats": None,
        "spliced": None,
        "seconds_to_recover": round(recover_s, 3),
        "undefined": tally.undefined,
        "tracebacks": len(logs.tracebacks),
        "log_lines": dict(logs.lines),
        "still_failing": problems,
        "failing_at_first": first,
        "rpcs": len(rpcs),
        "seconds": round(fuzz_s, 2),
        "kinds": dict(tally.kinds),
        "statuses": {name: dict(counts) for name, counts in sorted(tally.statuses.items())},
        "details": tally.details,
        "undefined_examples": tally.examples,
        "traceback_examples": logs.tracebacks[:10],
    }
