"""Version skew: services of the previous release and of this one, as real processes,
work together in every order an upgrade passes through (docs/compatibility.md).

Under a scheduler of each release (with the current predictor and Triton):

1. a previous-release worker serves a client written against, and running, the
   previous release's SDK: a whole ``replay`` generation, a cancelled one, and a
   long one preempted by a short one and resumed (``ssjf+preempt``, one slot);
2. a rolling worker upgrade mid-request: a current worker joins, the old one is
   drained (SIGTERM) and hands its running job back, the scheduler resumes it on the
   new worker from the text so far, and it is cancelled there (current SDK);
3. the current worker serves the same client run with the current SDK.

The ``replay`` model emits " replay1 replay2 ...", numbering continued on resume, so
a lost, repeated or garbled token across the versions shows in the text, and the
token counts are checked against it. Each process proves where it imported its code
from. Not covered: TLS and tokens between releases, the SmolLM2 model (the
replay model exercises the same worker and scheduler paths in seconds).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from compat_procs import Backends, Release, Service, grpc_serving, pool, start, wait_for
from sdk_client import CANCELLED_MAX_TOKENS, PREEMPTED_TOKENS, PREEMPTING_TOKENS

from shortline.client import ClientOptions, ShortlineClient
from shortline.common.net import free_ports

CLIENT = Path(__file__).with_name("sdk_client.py")
WHOLE_TOKENS = 24
# Both need the predictor's answer for the prompt (a cache hit, its embedding): the
# scheduler-predictor contract worked. Not "fallback".
PREDICTED = ("predictor", "cache")
SLOTS = "4"


def replay_text(first: int, last: int) -> str:
    return "".join(f" replay{i}" for i in range(first, last + 1))


def start_scheduler(release: Release, backends: Backends, logs: Path) -> tuple[Service, str, str]:
    """A scheduler of ``release`` with flags v0.1.0 already had; its public and
    internal addresses. A long predictor timeout: a fallback would hide a broken
    scheduler-predictor contract."""
    public, internal = free_ports(2)
    args = [
        "scheduler", "serve", "--port", str(public), "--internal-port", str(internal),
        "--predictor", backends.predictor_address, "--predictor-timeout-ms", "5000",
        "--outcome-log", str(logs / f"outcomes-{release.name}.sqlite"),
        "--journal", str(logs / f"journal-{release.name}.sqlite"),
        "--heartbeat-interval-s", "0.5", "--drain-grace-s", "1",
        # One slot per worker and a preempting policy: a short request waiting
        # behind a long one preempts it (sdk_client.py).
        "--slots", "1", "--policy", "ssjf+preempt", "--preempt-max-fraction", "1",
    ]  # fmt: skip
    service = start(f"scheduler-{release.name}", release, args, logs)
    return service, f"127.0.0.1:{public}", f"127.0.0.1:{internal}"


def start_worker(
    release: Release,
    worker_id: str,
    triton_url: str,
    scheduler: str,
    logs: Path,
    services: list[Service],
) -> Service:
    """A worker of ``release`` (added to ``services`` at once, to be stopped whatever
    happens) joined to ``scheduler``'s pool (waited for). The previous release names
    its models; the current one runs with its defaults, as a fresh deployment would."""
    port = free_ports(1)[0]
    args = ["worker", "serve", "--triton", triton_url, "--port", str(port)]
    args += ["--scheduler", scheduler, "--worker-id", worker_id, "--slots", SLOTS]
    args += ["--drain-grace-s", "0.2", "--health-poll-s", "0.5"]
    if release.name != "current":
        args += ["--models", "replay=raw:65536"]
    worker = start(worker_id, release, args, logs)
    services.append(worker)

    def joined() -> bool:
        status = pool(scheduler).get(worker_id)
        return status is not None and status.alive and "replay" in status.models

    wait_for(joined, 60, f"{worker_id} registered with replay", worker)
    worker.check_origin()
    return worker


def run_client(release: Release, scheduler: str, name: str) -> dict[str, Any]:
    """``sdk_client.py`` with ``release``'s SDK (checked) against ``scheduler``."""
    done = subprocess.run(
        [sys.executable, str(CLIENT), scheduler, name, str(WHOLE_TOKENS)],
        cwd=release.root,
        env=release.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    origin = Path(out["shortline_file"]).resolve().parent.parent
    assert origin == release.root.resolve(), f"{name} ran the SDK from {origin}"
    return out


def check_client(out: dict[str, Any], worker_id: str) -> None:
    """The whole generation exact and counted; the cancelled one cancelled where it
    ran, its text exactly the tokens it counts; the preempted one resumed after the
    short one without a gap or a repeat."""
    whole = out["whole"]
    assert whole["text"] == replay_text(1, WHOLE_TOKENS)
    assert whole["result"]["actual_tokens"] == WHOLE_TOKENS
    assert whole["result"]["finish_reason"] == "length"
    assert whole["result"]["worker_id"] == worker_id
    assert whole["result"]["prediction_source"] in PREDICTED

    cancelled = out["cancelled"]
    assert cancelled["state"] == "cancelled"
    result = cancelled["result"]
    assert result["finish_reason"] == "cancelled"
    assert 0 < result["actual_tokens"] < CANCELLED_MAX_TOKENS
    assert cancelled["text"] == replay_text(1, result["actual_tokens"])

    for key, tokens, preemptions in (
        ("preempting", PREEMPTING_TOKENS, 0),
        ("preempted", PREEMPTED_TOKENS, 1),
    ):
        run, result = out[key], out[key]["result"]
        assert run["text"] == replay_text(1, tokens) and result["actual_tokens"] == tokens
        assert result["finish_reason"] == "length" and result["worker_id"] == worker_id
        assert result["prediction_source"] in PREDICTED
        predicted = {k: out[k]["accepted"]["predicted_tokens"] for k in ("preempted", "preempting")}
        assert result["preemptions"] == preemptions, f"{key}: predictions {predicted}"


def rolling_upgrade(
    scheduler: tuple[Service, str, str],
    old_worker: Service,
    start_new: Callable[[], Service],
) -> tuple[Service, Any, str, int]:
    """A long request on ``old_worker``; ``start_new()`` adds a worker, the old one
    drains and hands the request over; cancelled once the new worker has streamed
    some of it. Returns the new worker, the request's result and text, and the
    tokens it had when it was handed over."""
    _, public, internal = scheduler
    client = ShortlineClient(ClientOptions(target=public, timeout_seconds=120.0))
    stream = client.generate(
        "rolling upgrade", model="replay", max_tokens=5000, ignore_eos=True, request_id="rolling"
    )
    first = threading.Event()
    failed: list[BaseException] = []

    def read() -> None:
        try:
            for _ in stream:
                first.set()
        except BaseException as exc:  # reported by the test thread
            failed.append(exc)
        first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first.wait(30) and not failed, failed
        new_worker = start_new()
        assert pool(internal)[old_worker.name].slots_used == 1
        assert old_worker.stop() == 0, old_worker.tail()  # drained, then exited cleanly
        wait_for(
            lambda: getattr(pool(internal).get(new_worker.name), "slots_used", 0) == 1,
            30,
            "request resumed on the new worker",
            new_worker,
        )
        handed_over = len(stream.text.split())
        wait_for(lambda: len(stream.text.split()) >= handed_over + 20, 30, "text after resume")
        assert client.cancel("rolling") == "cancelled"
        reader.join(30)
        assert not reader.is_alive() and not failed, failed
        return new_worker, stream.result, stream.text, handed_over
    finally:
        client.close()


@contextlib.contextmanager
def running(services: list[Service]) -> Iterator[None]:
    """Stops every service at the end; their logs go to the captured output (shown
    on a failure)."""
    try:
        yield
    finally:
        for service in reversed(services):
            code = service.stop()
            print(f"--- {service.name} (exit {code}) ---\n{service.tail(60)}")


@pytest.mark.parametrize("scheduler_from", ["current", "previous"])
def test_workers_and_sdks_of_both_releases_under_each_scheduler(
    scheduler_from: str,
    backends: Backends,
    previous_release: Release,
    current_release: Release,
    tmp_path: Path,
) -> None:
    old, new = previous_release, current_release
    backends.wait_ready()
    services: list[Service] = []
    with running(services):
        scheduler = start_scheduler(new if scheduler_from == "current" else old, backends, tmp_path)
        services.append(scheduler[0])
        wait_for(lambda: grpc_serving(scheduler[1]), 60, "scheduler SERVING", scheduler[0])
        scheduler[0].check_origin()
        internal = scheduler[2]

        triton = backends.triton_url
        old_worker = start_worker(old, f"worker-{old.name}", triton, internal, tmp_path, services)
        check_client(run_client(old, scheduler[1], f"sdk-{old.name}"), old_worker.name)

        def start_new() -> Service:
            return start_worker(new, "worker-current", triton, internal, tmp_path, services)

        new_worker, result, text, handed_over = rolling_upgrade(scheduler, old_worker, start_new)
        assert result is not None
        assert text == replay_text(1, result.actual_tokens)  # no gap, no repeat at the hand-over
        assert result.actual_tokens >= handed_over + 20
        assert result.finish_reason == "cancelled"
        # Not result.worker_id: a cancelled result names the worker whose run last
        # *ended* (here the old one's hand-over), in both releases. The text after the
        # old worker exited is the new worker's. (A drain's hand-over is no preemption.)
        assert result.prediction_source in PREDICTED

        check_client(run_client(new, scheduler[1], "sdk-current"), new_worker.name)
