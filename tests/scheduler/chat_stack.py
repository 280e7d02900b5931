"""A live stack whose worker formats chat for ``replay`` too (``replay=chatml``): the
replay model ignores its input and reads " replay1 replay2 ...", so a chat request's
text is known exactly; the formatting itself is tested in tests/worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from live_stack import Stack, stack, wait_for

CHAT_SETTINGS = "smollm2-135m-instruct=smollm2:4096,replay=chatml:65536"
# The worker's default: replay served raw, which has no chat template.
RAW_SETTINGS = "smollm2-135m-instruct=smollm2:4096,replay=raw:65536"


async def add_worker(s: Stack, triton_url: str, worker_id: str, settings: str) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.service.server import WorkerServer

    w = WorkerServer(
        WorkerConfig(
            triton=triton_url,
            slots=1,
            scheduler=s.scheduler.internal_address,
            worker_id=worker_id,
            health_poll_s=0.5,
            model_settings=settings,
        ),
        triton_url,
    )
    await w.start()
    s.workers.append(w)  # stopped by ``stack``
    await wait_for(lambda: worker_id in s.scheduler.plane.workers)


@contextlib.asynccontextmanager
async def chat_stack(
    triton_url: str, tmp_path: Path, settings: str = CHAT_SETTINGS, **cfg: Any
) -> AsyncIterator[Stack]:
    async with stack(triton_url, tmp_path, workers=0, **cfg) as s:
        await add_worker(s, triton_url, "w0", settings)
        yield s
