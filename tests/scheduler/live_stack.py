"""A live scheduler with real workers on the session's embedded Triton, for the
service tests: the ``replay`` model emits exactly max_tokens tokens reading
" replay1 replay2 ...", numbering continued on resume, so a gap or a repeat
shows in the text."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.server import SchedulerServer
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc


def replay_text(first: int, last: int) -> str:
    return "".join(f" replay{i}" for i in range(first, last + 1))


def replay_request(
    request_id: str, max_tokens: int, prompt: str = "go", **fields: Any
) -> scheduler_pb2.GenerateRequest:
    """A ``replay`` request of exactly ``max_tokens`` tokens (EOS ignored)."""
    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=fields.pop("model", "replay"),
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(ignore_eos=True),
        **fields,
    )


@dataclass
class Stack:
    scheduler: SchedulerServer
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    workers: list[Any] = field(default_factory=list)

    async def generate(
        self,
        request_id: str,
        max_tokens: int,
        prompt: str = "go",
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
        **kw: Any,
    ) -> tuple[list[scheduler_pb2.GenerateResponse], str]:
        """One whole Generate stream; ``metadata`` carries e.g. the bearer token."""
        msgs = []
        call = self.stub.Generate(
            replay_request(request_id, max_tokens, prompt, **kw),
            timeout=60,
            metadata=metadata,
        )
        async for msg in call:
            msgs.append(msg)
        text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
        return msgs, text


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def stack(
    triton_url: str, tmp_path: Path, *, workers: int = 1, slots: int = 1, **cfg: Any
) -> AsyncIterator[Stack]:
    from services.worker.config import WorkerConfig
    from services.worker.service.server import WorkerServer
    from shortline.common.net import free_port

    config = SchedulerConfig(
        host="127.0.0.1",
        port=free_port(),
        internal_port=0,
        heartbeat_interval_s=0.2,
        outcome_log=str(tmp_path / "outcomes.sqlite"),
        **cfg,
    )
    server = SchedulerServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    s = Stack(server, scheduler_pb2_grpc.SchedulerServiceStub(channel))
    try:
        for i in range(workers):
            w = WorkerServer(
                WorkerConfig(
                    triton=triton_url,
                    slots=slots,
                    scheduler=server.internal_address,
                    worker_id=f"w{i}",
                    health_poll_s=0.5,
                ),
                triton_url,
            )
            await w.start()
            s.workers.append(w)
        await wait_for(lambda: len(server.plane.workers) == workers)
        yield s
    finally:
        for w in s.workers:
            with contextlib.suppress(Exception):
                await w.stop(0.1)
        await channel.close(None)
        await server.stop(0.1)
