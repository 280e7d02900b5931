"""1,000 generated messages over every RPC of every service answer defined statuses.

A predictor, a scheduler (no tokens) and a worker on the session's embedded
Triton run in this process (``bench/faults/inprocess.py``); the fuzzer
(``bench/faults/fuzz.py``, the ``--quick`` size of ``python -m bench.faults
--only fuzz``) finds every service through reflection and sends raw bytes:
random, mutated valid messages, valid messages with boundary values and unknown
fields. No call may end UNKNOWN or INTERNAL, hang, or log a traceback, and
afterwards every service serves an ordinary request (a replay Generate end to
end, a prediction, the worker's capacity, the internal pool).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shortline.predictor.v1 import predictor_pb2
from shortline.scheduler.v1 import internal_pb2, scheduler_pb2
from shortline.worker.v1 import worker_pb2

# bench/ is not installed (the wheel ships shortline and services): the benchmark's
# harness is imported from the checkout, as ``python -m bench.faults`` does.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench.faults import fuzz  # noqa: E402
from bench.faults.inprocess import in_process_stack  # noqa: E402

pytestmark = pytest.mark.slow

QUICK = 1_000


def _expected_rpcs() -> set[str]:
    """Every method of every service each listener must serve, by the fuzzer's names."""
    services = {
        "scheduler": [scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]],
        "internal": [internal_pb2.DESCRIPTOR.services_by_name["SchedulerInternalService"]],
        "worker": [worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]],
        "predictor": [predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"]],
    }
    names = set()
    for label, found in services.items():
        names |= {f"{label}:{s.name}/{m.name}" for s in found for m in s.methods}
        names |= {f"{label}:Health/Check", f"{label}:Health/Watch"}
        names.add(f"{label}:ServerReflection/ServerReflectionInfo")
    return names


async def test_fuzzed_messages_get_defined_statuses_and_services_survive(
    embedded_triton: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    started = time.perf_counter()
    async with in_process_stack(embedded_triton.grpc_url, tmp_path) as stack:
        result = await fuzz.run(stack.targets, QUICK, stack.hints, stack.templates)
    statuses = result["statuses"]
    assert set(statuses) == _expected_rpcs()  # every RPC of every service, ListModels too
    assert sum(sum(c.values()) for c in statuses.values()) == QUICK
    assert result["completed"] == QUICK and result["hung"] == 0 and result["lost"] == 0
    undefined = {
        name: {code: n for code, n in counts.items() if code in fuzz.UNDEFINED}
        for name, counts in statuses.items()
        if fuzz.UNDEFINED & set(counts)
    }
    assert not undefined, (undefined, result["undefined_examples"])
    # The cases reach past parsing: valid requests were served on the main RPCs.
    for name in ("scheduler:SchedulerService/Generate", "worker:WorkerService/Execute"):
        assert statuses[name].get("OK", 0) > 0, statuses[name]
    # Every INVALID_ARGUMENT says what is wrong.
    for name, by_code in result["details"].items():
        assert all(by_code.get("INVALID_ARGUMENT", ["ok"])), name
    # Afterwards: a replay Generate end to end, a prediction, the worker, the pool.
    assert result["still_failing"] == [], result["still_failing"]
    # No traceback and no multi-line record, from any logger (grpc's own included).
    assert result["tracebacks"] == 0, result["traceback_examples"]
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r.getMessage()[:200] for r in shown if r.exc_info or "\n" in r.getMessage()]
    assert time.perf_counter() - started < 60
