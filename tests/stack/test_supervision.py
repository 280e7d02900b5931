"""The launcher supervises: one crash is one restart, not an outage.

Under the launcher (two workers, Triton with the replay model), kill -9 a worker
while a dozen long streams run on both: the launcher says so and restarts it,
every stream ends with exactly its text (the scheduler resumes the lost
worker's jobs elsewhere; replay's " replay1 replay2 ..." shows any gap or
repeat), and no other service stopped. The predictor, killed, comes back too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
from stacks import stack_config

from shortline.client import AsyncShortlineClient, ClientOptions
from shortline.stack import Child, Stack

pytestmark = pytest.mark.slow

LONG = 400  # tokens: about 6 s at 10 + 1 ms per step and 6 sequences a worker


def replay_text(first: int, last: int) -> str:
    return "".join(f" replay{i}" for i in range(first, last + 1))


class Lines(list[str]):
    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self if needle in line]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no line with {needle!r} in {timeout:g} s: {list(self)}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Lines]]:
    cfg = stack_config(
        tmp_path_factory.mktemp("supervision"),
        workers=2,
        slots=8,
        triton_models="replay",
        replay_step_a_ms=10.0,
        replay_step_b_ms=1.0,
    )
    lines = Lines()
    with Stack(cfg, say=lines.append) as running:
        yield running, lines


def child(stack: Stack, name: str) -> Child:
    return next(c for c in stack.children if c.name == name)


def pids(stack: Stack) -> dict[str, int]:
    return {c.name: c.process.pid for c in stack.children if c.process is not None}


async def test_a_killed_worker_is_restarted_and_its_streams_finish_elsewhere(
    stack: tuple[Stack, Lines],
) -> None:
    running, lines = stack
    before = pids(running)
    options = ClientOptions(target=running.scheduler_address, timeout_seconds=90)
    async with AsyncShortlineClient(options) as client:
        streams = [
            client.generate(f"stream {i}", model="replay", max_tokens=LONG, ignore_eos=True)
            for i in range(12)
        ]
        texts = [asyncio.create_task(s.collect()) for s in streams]
        # Every stream has started (on one worker or the other) before the kill.
        deadline = time.monotonic() + 30
        while not all(s.text for s in streams):
            assert time.monotonic() < deadline, "streams did not start"
            await asyncio.sleep(0.05)
        os.kill(before["worker-1"], signal.SIGKILL)
        done = await asyncio.gather(*texts)
    assert done == [replay_text(1, LONG)] * 12
    assert all(s.result is not None and s.result.actual_tokens == LONG for s in streams)
    # Some of them were on the killed worker and finished on the other one.
    assert {s.result.worker_id for s in streams if s.result is not None} >= {"worker-2"}
    line = await asyncio.to_thread(lines.wait_for, "worker-1 was killed by SIGKILL", 5)
    assert "restarting it in 0.5 s" in line and "worker-1.log" in line
    await asyncio.to_thread(lines.wait_for, "worker-1 is SERVING again", 60)
    after = pids(running)
    assert after["worker-1"] != before["worker-1"]
    assert {k: v for k, v in after.items() if k != "worker-1"} == {
        k: v for k, v in before.items() if k != "worker-1"
    }, "another service was stopped"
    assert running.restarts("worker-1") == 1
    assert all(running.restarts(n) == 0 for n in before if n != "worker-1")


async def test_a_killed_predictor_is_restarted(stack: tuple[Stack, Lines]) -> None:
    running, lines = stack
    before = pids(running)
    os.kill(before["predictor"], signal.SIGKILL)
    line = await asyncio.to_thread(lines.wait_for, "predictor was killed by SIGKILL", 5)
    assert "restarting it in 0.5 s" in line
    await asyncio.to_thread(lines.wait_for, "predictor is SERVING again", 90)
    assert running.healthy(child(running, "predictor"))
    options = ClientOptions(target=running.scheduler_address, timeout_seconds=60)
    async with AsyncShortlineClient(options) as client:
        stream = client.generate("after", model="replay", max_tokens=20, ignore_eos=True)
        assert await stream.collect() == replay_text(1, 20)
    after = pids(running)
    assert {k: v for k, v in after.items() if k != "predictor"} == {
        k: v for k, v in before.items() if k != "predictor"
    }
