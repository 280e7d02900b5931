"""`shortline up` end to end: every service as a real process on 127.0.0.1.

One stack per module (Triton with smollm2 and replay, predictor, scheduler,
two workers), driven through the client SDK as a user would.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import stacks
from processes import assert_nothing_left, descendants, shm_regions
from stacks import up_argv, wait_until_serving

from services.scheduler.core.policies import DEFAULT_POLICY
from shortline.client import AsyncShortlineClient, ClientOptions, ShortlineClient
from shortline.stack import Stack, StackConfig, port_is_free

pytestmark = pytest.mark.slow

LENGTH_MODEL = "Meta-Llama-3-8B-Instruct"


def stack_config(tmp: Path, **overrides: object) -> StackConfig:
    fields: dict[str, object] = dict(
        workers=2, slots=4, replay_step_a_ms=10.0, replay_step_b_ms=1.0
    )
    fields.update(overrides)
    return stacks.stack_config(tmp, **fields)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(tmp_path_factory.mktemp("stack"))
    with Stack(cfg) as running:
        yield running


def client(stack: Stack) -> ShortlineClient:
    return ShortlineClient(ClientOptions(target=stack.scheduler_address, timeout_seconds=120))


def test_smollm2_answers_through_the_whole_chain(stack: Stack) -> None:
    with client(stack) as c:
        stream = c.generate("What is the capital of France?", max_tokens=24, temperature=0.0)
        text = "".join(stream)
    assert stream.result is not None
    assert stream.result.finish_reason in {"stop", "length"}
    assert 0 < stream.result.actual_tokens <= 24
    assert "Paris" in text
    assert stream.result.worker_id.startswith("worker-")
    assert stream.result.prediction_source in {"predictor", "fallback", "cache"}


def test_replay_generates_exactly_the_requested_length(stack: Stack) -> None:
    with client(stack) as c:
        stream = c.generate(
            "Write a long essay about rivers.",
            model="replay",
            max_tokens=37,
            ignore_eos=True,
            length_model=LENGTH_MODEL,
        )
        text = "".join(stream)
    assert stream.result is not None
    assert stream.result.actual_tokens == 37
    assert stream.result.prediction_source == "predictor"
    assert stream.result.predicted_tokens > 0
    assert text.split()[-1] == "replay37"


def test_cancel_from_the_client_frees_the_worker_slot(stack: Stack) -> None:
    with client(stack) as c:
        stream = c.generate("Count slowly.", model="replay", max_tokens=2000, ignore_eos=True)
        it = iter(stream)
        next(it)  # running on a worker now
        assert stream.cancel() == "cancelled"
        for _ in it:  # the stream ends with a result that says so
            pass
        assert stream.result is not None
        assert stream.result.finish_reason == "cancelled"
        assert stream.result.actual_tokens < 2000
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = c.stats()
            if stats.running == 0 and all(w.slots_used == 0 for w in stats.workers):
                break
            time.sleep(0.1)
        assert stats.running == 0
        assert all(w.slots_used == 0 for w in stats.workers)
        assert stats.cancelled >= 1


async def test_two_clients_at_once_both_get_their_own_answers(stack: Stack) -> None:
    options = ClientOptions(target=stack.scheduler_address, timeout_seconds=120)
    async with AsyncShortlineClient(options) as a, AsyncShortlineClient(options) as b:
        s1 = a.generate("one", model="replay", max_tokens=30, ignore_eos=True)
        s2 = b.generate("two", model="replay", max_tokens=45, ignore_eos=True)
        t1, t2 = await asyncio.gather(s1.collect(), s2.collect())
    assert s1.result is not None and s1.result.actual_tokens == 30
    assert s2.result is not None and s2.result.actual_tokens == 45
    assert t1.split()[-1] == "replay30"
    assert t2.split()[-1] == "replay45"


def test_every_service_exposes_prometheus_metrics(stack: Stack) -> None:
    cfg = stack.cfg
    with client(stack) as c:
        "".join(c.generate("hello", model="replay", max_tokens=5, ignore_eos=True))

    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body: bytes = r.read()
        return body.decode()

    scheduler = scrape(cfg.metrics_base_port)
    for name in (
        "shortline_queue_depth",
        "shortline_queue_wait_seconds_bucket",
        "shortline_time_to_first_token_seconds_bucket",
        "shortline_completion_seconds_bucket",
        "shortline_generated_tokens_total",
        "shortline_predictor_call_seconds_bucket",
        "shortline_prediction_abs_error_tokens_bucket",
        "shortline_preemptions_total",
        "shortline_predictor_fallbacks_total",
        "shortline_semantic_cache_hits_total",
    ):
        assert name in scheduler, f"scheduler metrics lack {name}"
    assert f'policy="{DEFAULT_POLICY}"' in scheduler
    predictor = scrape(cfg.metrics_base_port + 1)
    assert "shortline_predict_seconds_bucket" in predictor
    assert "shortline_predict_batch_prompts_bucket" in predictor
    for i in range(cfg.workers):
        worker = scrape(cfg.metrics_base_port + 2 + i)
        assert "shortline_worker_slots_used" in worker
        assert "# TYPE shortline_worker_slots gauge" in worker
        # Each process exports only its own families (one registry per service).
        assert "shortline_queue_depth" not in worker and "shortline_predict_seconds" not in worker
    assert "shortline_queue_depth" not in predictor and "shortline_worker_slots" not in predictor
    assert "shortline_worker_slots" not in scheduler
    assert "shortline_predict_seconds" not in scheduler


def test_up_command_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The real `shortline up`: prints the address, and SIGTERM leaves nothing behind."""
    cfg = stack_config(tmp_path, workers=1)
    argv = up_argv(cfg)
    shm_before = shm_regions()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = wait_until_serving(proc)
    assert any(f"127.0.0.1:{cfg.scheduler_port}" in line for line in lines)
    with ShortlineClient(ClientOptions(target=f"127.0.0.1:{cfg.scheduler_port}")) as c:
        stream = c.generate("hi", model="replay", max_tokens=3, ignore_eos=True)
        assert "".join(stream).split()[-1] == "replay3"
    children = descendants(proc.pid)
    assert children, "the launcher started no processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    assert_nothing_left(children, shm_before)
    ports = [
        cfg.scheduler_port,
        cfg.scheduler_internal_port,
        cfg.predictor_port,
        cfg.triton_grpc_port,
        cfg.worker_base_port,
    ]
    assert all(port_is_free("127.0.0.1", p) for p in ports)


def test_a_taken_port_gives_a_one_line_error_naming_it(tmp_path: Path) -> None:
    cfg = stack_config(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", cfg.predictor_port))
        sock.listen()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "shortline.cli",
                "up",
                f"--scheduler-port={cfg.scheduler_port}",
                f"--predictor-port={cfg.predictor_port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert str(cfg.predictor_port) in err[0] and "predictor" in err[0]
