"""A predictor, a scheduler and one worker in this process, on a given Triton.

The fuzz scenario needs every service's listener, not process boundaries: in
one process the test can read every log line the services write. Tokens are
off (the fuzzer's calls must reach the servicers, not stop at
``UNAUTHENTICATED``) and the worker serves ``replay`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from services.predictor.config import PredictorConfig
from services.predictor.service import PredictorServer
from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from services.worker.config import REPLAY, TritonServeConfig, WorkerConfig
from services.worker.service.server import WorkerServer
from services.worker.triton.embedded import EmbeddedTriton
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.predictor.v1 import predictor_pb2
from shortline.scheduler.v1 import scheduler_pb2
from shortline.worker.v1 import worker_pb2

REPLAY_MODELS = f"{REPLAY}=raw:65536"


@dataclass
class InProcessStack:
    predictor: PredictorServer
    scheduler: SchedulerServer
    worker: WorkerServer
    hints: dict[str, list[str]] = field(default_factory=dict)
    templates: dict[str, Message] = field(default_factory=dict)

    @property
    def targets(self) -> dict[str, str]:
        """Every listener, by the name the fuzz tables use."""
        return {
            "scheduler": self.scheduler.address,
            "internal": self.scheduler.internal_address,
            "worker": self.worker.address,
            "predictor": self.predictor.cfg.address,
        }


@contextlib.asynccontextmanager
async def in_process_stack(
    triton_url: str, workdir: Path, slots: int = 4
) -> AsyncIterator[InProcessStack]:
    predictor = PredictorServer(PredictorConfig(port=free_port(), threads=1))
    await predictor.start()
    scheduler = SchedulerServer(
        SchedulerConfig(
            host="127.0.0.1",
            port=free_port(),
            internal_port=0,
            predictor=predictor.cfg.address,
            outcome_log=str(workdir / "outcomes.sqlite"),
            heartbeat_interval_s=0.5,
        )
    )
    worker: WorkerServer | None = None
    try:
        await scheduler.start()
        worker = WorkerServer(
            WorkerConfig(
                triton=triton_url,
                slots=slots,
                scheduler=scheduler.internal_address,
                worker_id="fuzz-worker",
                models=REPLAY_MODELS,
                health_poll_s=0.5,
            ),
            triton_url,
        )
        await worker.start()
        await _until(lambda: len(scheduler.plane.workers) == 1, 20.0)
        assert predictor.core is not None
        targets = list(predictor.core.known_targets())
        hints = {
            "model": [REPLAY],
            "target_model": targets,
            "length_model": targets,
            "models": [REPLAY],
        }
        yield InProcessStack(predictor, scheduler, worker, hints, templates(targets[0]))
    finally:
        if worker is not None:
            await worker.stop(0.5)
        await scheduler.stop(0.5)
        await predictor.stop(0.5)


def templates(target: str) -> dict[str, Message]:
    """A request each service serves, by type: the fuzzer varies one or two fields of it."""
    sampling = common_pb2.SamplingParams(ignore_eos=True)
    examples: list[Message] = [
        scheduler_pb2.GenerateRequest(model=REPLAY, prompt="fuzz", max_tokens=4, sampling=sampling),
        worker_pb2.ExecuteRequest(model=REPLAY, prompt="fuzz", max_tokens=4, sampling=sampling),
        predictor_pb2.PredictRequest(target_model=target, prompts=["fuzz"]),
        # A worker nobody can reach: the scheduler must cope with it, not the fuzzer.
        scheduler_pb2.RegisterWorkerRequest(
            worker_id="fuzz-ghost", address="127.0.0.1:9", slots=1, models=[REPLAY]
        ),
        scheduler_pb2.HeartbeatRequest(worker_id="fuzz-worker", slots_used=0, serving=True),
        health_pb2.HealthCheckRequest(service=""),
    ]
    return {m.DESCRIPTOR.full_name: m for m in examples}


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not register")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def replay_triton() -> Iterator[EmbeddedTriton]:
    """An embedded Triton with the replay model only (a few seconds to start)."""
    with EmbeddedTriton(TritonServeConfig(models=REPLAY, replay_step_a_ms=10.0)) as triton:
        yield triton


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="shortline-faults-") as tmp:
        yield Path(tmp)
