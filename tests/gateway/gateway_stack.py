"""A live stack (scheduler + worker on the embedded Triton's ``replay`` model) with the
gateway in front, served by uvicorn in the test's own event loop on a free loopback
port; and the strict conformance check of responses against the ``openai`` models."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import uvicorn
from live_stack import Stack, stack

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from shortline.common.net import free_port


@dataclasses.dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    stack: Stack | None

    def client(self, api_key: str = "none", **kw: Any) -> openai.AsyncOpenAI:
        """The official client; no retries, so each error is the gateway's first answer."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kw)


@contextlib.asynccontextmanager
async def serve_gateway(cfg: GatewayConfig) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(dataclasses.replace(cfg, port=port)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def gateway_stack(
    triton_url: str, tmp_path: Path, gateway: dict[str, Any] | None = None, **cfg: Any
) -> AsyncIterator[Gateway]:
    async with stack(triton_url, tmp_path, **cfg) as s:
        gw = GatewayConfig(scheduler=s.scheduler.address, retries=0, **(gateway or {}))
        async with serve_gateway(gw) as url:
            yield Gateway(url, s)


def _no_extras(model: pydantic.BaseModel, where: str) -> None:
    extra = model.__pydantic_extra__ or {}
    assert not extra, f"{where}: fields the API does not define: {sorted(extra)}"
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, pydantic.BaseModel):
                _no_extras(item, f"{where}.{name}[{i}]")


def conforms(cls: type[pydantic.BaseModel], data: dict[str, Any], *, chunk: bool = False) -> None:
    """``data`` validates against ``cls`` in strict mode and carries no field it does not
    define. A stream chunk's ``finish_reason`` is null until the last one, as OpenAI sends
    it, though the package types it non-null (its Completion model serves both): null is
    accepted there and nowhere else."""
    if chunk:
        data = dict(data)
        data["choices"] = [
            {**c, "finish_reason": c["finish_reason"] or "stop"} for c in data["choices"]
        ]
    _no_extras(cls.model_validate(data, strict=True), cls.__name__)
