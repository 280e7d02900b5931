"""Scenario ``disconnects``: how soon a slot is free once its client is gone, per client kind.

A client that disappears mid-stream (without ``reattach_grace_seconds``) must
not leave a worker generating for nobody. For each kind of going away, one
long replay stream at a time is started and, once text arrives, ended that
way; the scheduler's internal ``GetStats`` is then polled until its running
count and every worker's ``slots_used`` are back where they were before the
stream. Kinds: the sync SDK's ``close()``, the asyncio SDK's ``close()``, a
raw gRPC channel closed under its stream, a client process killed with
SIGKILL (its socket closed by the kernel), and an explicit ``Cancel`` RPC.
A slot not free in :data:`FREE_TIMEOUT_S` counts as hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from bench.faults.live import running_stack
from shortline.client import AsyncShortlineClient, ClientOptions, ShortlineClient
from shortline.client.types import build_request
from shortline.scheduler.v1 import internal_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

TOKENS = 3000  # about 30 s of replay: still running whenever the client goes
FREE_TIMEOUT_S = 15.0
START_TIMEOUT_S = 30.0
POLL_S = 0.005

_CHILD = """
import sys
from shortline.client import ClientOptions, ShortlineClient
client = ShortlineClient(ClientOptions(target=sys.argv[1]))
for i, _ in enumerate(client.generate("killed", model="replay", max_tokens=int(sys.argv[2]),
                                      ignore_eos=True)):
    if i == 0:
        print("started", flush=True)
"""


class Pool:
    """The scheduler's running count and slots in use, over one kept channel."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = internal_pb2_grpc.SchedulerInternalServiceStub(self._channel)

    def busy(self) -> tuple[int, int]:
        stats = self._stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=2.0)
        return int(stats.running), sum(int(w.slots_used) for w in stats.workers)

    def wait_for(self, want: tuple[int, int], timeout: float) -> float | None:
        """Seconds until ``busy()`` is ``want`` (None: not within ``timeout``)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.busy() == want:
                return time.monotonic() - started
            time.sleep(POLL_S)
        return None

    def close(self) -> None:
        self._channel.close()


# Each kind starts a stream, returns once it has text, and gives back how to end it.
Start = Callable[[str], Callable[[], None]]


def _sync_close(address: str) -> Callable[[], None]:
    client = ShortlineClient(ClientOptions(target=address))
    stream = client.generate("sync", model="replay", max_tokens=TOKENS, ignore_eos=True)
    started = threading.Event()

    def read() -> None:
        with contextlib.suppress(Exception):
            for _ in stream:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(START_TIMEOUT_S):
        raise RuntimeError("sync stream did not start")
    return client.close


def _sync_cancel(address: str) -> Callable[[], None]:
    client = ShortlineClient(ClientOptions(target=address, timeout_seconds=10))
    stream = client.generate("cancel", model="replay", max_tokens=TOKENS, ignore_eos=True)
    started = threading.Event()

    def read() -> None:
        with contextlib.suppress(Exception):
            for _ in stream:
                started.set()
        client.close()

    threading.Thread(target=read, daemon=True).start()
    if not started.wait(START_TIMEOUT_S):
        raise RuntimeError("stream to cancel did not start")

    def cancel() -> None:
        client.cancel(stream.request_id)

    return cancel


def _raw_grpc_close(address: str) -> Callable[[], None]:
    channel = grpc.insecure_channel(address)
    request = build_request(
        "raw",
        request_id=uuid.uuid4().hex,
        model="replay",
        max_tokens=TOKENS,
        temperature=None,
        top_p=None,
        ignore_eos=True,
        priority=None,
        length_model="",
    )
    call = scheduler_pb2_grpc.SchedulerServiceStub(channel).Generate(request)
    for msg in call:
        if msg.HasField("delta"):
            break
    # The call is kept referenced until the channel closes: a call object that is garbage
    # collected cancels its RPC, which would end the stream before it is measured.
    kept = [call]

    def close() -> None:
        channel.close()
        kept.clear()

    return close


def _killed_process(address: str) -> Callable[[], None]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, address, str(TOKENS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "started":
        proc.kill()
        raise RuntimeError("client process did not start its stream")

    def kill() -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    return kill


def _aio_close(address: str) -> Callable[[], None]:
    """An event loop in its own thread: the client lives there, close() is sent to it."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> AsyncShortlineClient:
        client = AsyncShortlineClient(ClientOptions(target=address))
        stream = client.generate("aio", model="replay", max_tokens=TOKENS, ignore_eos=True)

        async def read() -> None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await stream.collect()

        client_task = asyncio.ensure_future(read())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not stream.text:
            if time.monotonic() > deadline:
                raise RuntimeError("asyncio stream did not start")
            await asyncio.sleep(0.01)
        client._bench_task = client_task  # type: ignore[attr-defined]  # kept alive
        return client

    client = asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S + 5)

    def close() -> None:
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)

    return close


KINDS: dict[str, Start] = {
    "sync-close": _sync_close,
    "aio-close": _aio_close,
    "grpc-channel-close": _raw_grpc_close,
    "process-kill": _killed_process,
    "cancel-rpc": _sync_cancel,
}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def disconnects(quick: bool) -> dict[str, Any]:
    """Slot free time per client kind (see the module docstring)."""
    samples = 3 if quick else 10
    freed: dict[str, list[float]] = {kind: [] for kind in KINDS}
    hung = 0
    problems: list[str] = []
    with running_stack() as (stack, _lines):
        pool = Pool(f"{stack.cfg.host}:{stack.cfg.scheduler_internal_port}")
        try:
            idle = (0, 0)
            for kind, start in KINDS.items():
                for _ in range(samples):
                    if pool.wait_for(idle, FREE_TIMEOUT_S * 3) is None:
                        problems.append(f"{kind}: pool not idle before a sample")
                        break
                    end = start(stack.scheduler_address)
                    if pool.busy() == idle:
                        problems.append(f"{kind}: stream not counted running")
                    end()
                    took = pool.wait_for(idle, FREE_TIMEOUT_S)
                    if took is None:
                        hung += 1
                    else:
                        freed[kind].append(took)
        finally:
            pool.close()
    per_kind = {
        kind: {
            "samples": len(values),
            "p50_seconds": _quantile(values, 0.5),
            "p99_seconds": _quantile(values, 0.99),
        }
        for kind, values in freed.items()
    }
    total = sum(len(v) for v in freed.values())

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    figure = "slot free ms p50/p99: " + ", ".join(
        f"{k} {ms(v['p50_seconds'])}/{ms(v['p99_seconds'])}" for k, v in per_kind.items()
    )
    worst = [v["p99_seconds"] for v in per_kind.values() if v["p99_seconds"] is not None]
    return {
        "name": "disconnects",
        "accepted": total + hung,
        "completed": total,
        "lost": None,
        "hung": hung,
        "gaps": None,
        "repeats": None,
        "spliced": None,
        "seconds_to_recover": max(worst) if worst else None,
        "slot_free": per_kind,
        "figure": figure,
        "problems": problems,
    }
