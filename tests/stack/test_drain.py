"""Drain on SIGTERM, with real processes on 127.0.0.1 (the launcher's children).

A draining scheduler turns NOT_SERVING, refuses new requests with UNAVAILABLE,
lets admitted ones finish within its grace and ends the rest with UNAVAILABLE
naming the drain, then exits 0. A draining worker takes no new job, lets short
ones finish and hands the rest back: they resume on another worker with exactly
the text so far (the replay model's " replay1 replay2 ..." shows a gap or a
repeat). The launcher stops the scheduler before the workers, so a stop under
load finishes what can finish in the grace. Kubernetes gives each drain its time.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from processes import assert_nothing_left, descendants, shm_regions
from stacks import stack_config, up_argv, wait_until_serving

from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from shortline.stack import Child, Stack, grpc_serving

GRACE_S = 6.0


def replay_text(first: int, last: int) -> str:
    return "".join(f" replay{i}" for i in range(first, last + 1))


@dataclass
class Outcome:
    text: str = ""
    result: scheduler_pb2.GenerateResult | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    started: asyncio.Event | None = None


async def generate(
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
    request_id: str,
    max_tokens: int,
    started: asyncio.Event | None = None,
) -> Outcome:
    """One raw Generate stream (no SDK retries: the status is the server's own)."""
    out = Outcome(started=started)
    call = stub.Generate(
        scheduler_pb2.GenerateRequest(
            request_id=request_id,
            model="replay",
            prompt="drain",
            max_tokens=max_tokens,
            sampling=common_pb2.SamplingParams(ignore_eos=True),
        ),
        timeout=90,
    )
    try:
        async for msg in call:
            if msg.HasField("delta"):
                out.text += msg.delta.text
                if started is not None:
                    started.set()
            elif msg.HasField("result"):
                out.result = msg.result
    except grpc.aio.AioRpcError as exc:
        out.code, out.details = exc.code(), exc.details() or ""
    return out


def child(stack: Stack, name: str) -> Child:
    return next(c for c in stack.children if c.name == name)


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):  # type: ignore[arg-type]
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.2)


async def all_serving(stack: Stack, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub) -> None:
    """Every child SERVING and both workers registered with the scheduler."""
    await wait_until(lambda: all(stack.healthy(c) for c in stack.children), 60, "all SERVING")

    async def registered() -> bool:
        try:
            stats = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return len(stats.workers) == stack.cfg.workers

    deadline = time.monotonic() + 30
    while not await registered():
        assert time.monotonic() < deadline, "workers did not register again"
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(
        tmp_path_factory.mktemp("drain"),
        workers=2,
        slots=6,
        triton_models="replay",
        replay_step_a_ms=10.0,
        replay_step_b_ms=1.0,
        drain_grace_s=GRACE_S,
    )
    lines: list[str] = []
    with Stack(cfg, say=lines.append) as running:
        yield running


@pytest.mark.slow
async def test_a_draining_scheduler_refuses_new_work_and_ends_every_stream(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await all_serving(stack, stub)
        started = [asyncio.Event() for _ in range(6)]
        short = [asyncio.create_task(generate(stub, f"s{i}", 150, started[i])) for i in range(4)]
        long = [
            asyncio.create_task(generate(stub, f"l{i}", 3000, started[4 + i])) for i in range(2)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        proc = child(stack, "scheduler").process
        assert proc is not None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)

        refused = await generate(stub, "new-during-drain", 5)
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
        assert "draining" in refused.details and "another scheduler" in refused.details
        assert not await asyncio.to_thread(grpc_serving, stack.scheduler_address)
        # A retry of a request it holds still attaches (and is ended with it).
        again = asyncio.Event()
        reattached = asyncio.create_task(generate(stub, "l0", 3000, again))
        await asyncio.wait_for(again.wait(), 5)

        for out in await asyncio.gather(*short):
            assert out.code is None, out
            assert out.text == replay_text(1, 150)
            assert out.result is not None and out.result.actual_tokens == 150
        for out in [*await asyncio.gather(*long), await reattached]:
            assert out.code == grpc.StatusCode.UNAVAILABLE, out
            assert "drained for 6 s" in out.details, out.details
            assert out.text == replay_text(1, len(out.text.split()))  # what it got is exact
        assert await asyncio.to_thread(proc.wait, 30) == 0
        took = time.monotonic() - sent
        assert GRACE_S <= took < GRACE_S + 8, took
        # The launcher brings it back; the workers register with the new one.
        await all_serving(stack, stub)
        assert stack.restarts("scheduler") == 1


@pytest.mark.slow
async def test_a_draining_worker_hands_its_jobs_to_another_without_a_gap(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await all_serving(stack, stub)
        lengths = [1000] * 8 + [150] * 4  # 12 slots: the long ones outlast the grace
        started = [asyncio.Event() for _ in lengths]
        runs = [
            asyncio.create_task(generate(stub, f"w{i}", n, started[i]))
            for i, n in enumerate(lengths)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        worker = child(stack, "worker-1")
        proc = worker.process
        assert proc is not None and worker.log_path is not None
        proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*runs)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        for n, out in zip(lengths, outcomes, strict=True):
            assert out.code is None, out
            assert out.text == replay_text(1, n), f"gap or repeat in a {n}-token stream"
            assert out.result is not None and out.result.actual_tokens == n
        log = worker.log_path.read_text()
        handed = re.search(r"drained: (\d+) jobs still running after 6 s handed back", log)
        assert handed is not None, log[-2000:]
        assert int(handed.group(1)) >= 1


def log_time(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def first_line(path: Path, needle: str) -> str:
    return next(line for line in path.read_text().splitlines() if needle in line)


@pytest.mark.slow
async def test_the_launcher_drains_the_scheduler_before_the_workers(tmp_path: Path) -> None:
    cfg = stack_config(
        tmp_path, workers=2, slots=4, triton_models="replay", replay_step_a_ms=10.0,
        replay_step_b_ms=1.0,
    )  # fmt: skip
    shm_before = shm_regions()
    proc = subprocess.Popen(
        [*up_argv(cfg), f"--drain-grace-s={GRACE_S}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await asyncio.to_thread(wait_until_serving, proc)
        children = descendants(proc.pid)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cfg.scheduler_port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            started = [asyncio.Event() for _ in range(6)]
            lengths = [150] * 4 + [3000] * 2
            runs = [
                asyncio.create_task(generate(stub, f"u{i}", n, started[i]))
                for i, n in enumerate(lengths)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            proc.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*runs)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # The workers still served while the scheduler drained: short ones finished.
    for out in outcomes[:4]:
        assert out.code is None and out.text == replay_text(1, 150), out
    for out in outcomes[4:]:
        assert out.code == grpc.StatusCode.UNAVAILABLE and "drained" in out.details, out
    logs = Path(cfg.log_dir)
    drained = log_time(first_line(logs / "scheduler.log", "drained:"))
    for i in range(cfg.workers):
        assert log_time(first_line(logs / f"worker-{i + 1}.log", "draining:")) >= drained
    assert "did not exit cleanly" not in (logs / "triton.log").read_text()
    assert_nothing_left(children, shm_before)
