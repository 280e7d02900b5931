"""What the OpenAI-compatible gateway adds to a request, and what it sustains.

Run: ``.venv/bin/python -m bench.gateway [--requests 150 --concurrency 32 --seconds 6]``.

Starts one local stack (``shortline up``'s processes: Triton with the ``replay``
model at 1 ms a step, a predictor, the scheduler, one worker with 32 slots) and
``shortline gateway serve`` as its own process in front of it, as deployed.

- **latency**: one request at a time, alternating between a direct asyncio SDK
  call (one warm client) and the same request through the gateway (one warm
  HTTP/1.1 connection, a plain HTTP client so the ``openai`` package's own
  parsing is not counted), whole and streamed. The gateway's cost is the
  difference of the percentiles.
- **throughput**: ``--concurrency`` requests kept in flight for ``--seconds``,
  through the gateway and then directly: completed requests per second. On two
  cores shared by every process this is the machine's limit as much as the
  gateway's.

Prints a table and writes ``bench/results/gateway.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np

from shortline.client import AsyncShortlineClient
from shortline.common.net import free_port
from shortline.stack import Stack
from shortline.stack_plan import free_config

RESULTS = Path(__file__).resolve().parent.parent / "results"
PROMPT = "Explain shortest-job-first scheduling in one sentence."
MAX_TOKENS = 4

Call = Callable[[], Awaitable[None]]


def start_gateway(scheduler: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "shortline.cli", "gateway", "serve"]
    cmd += ["--port", str(port), "--scheduler", scheduler, "--retries", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the gateway did not become ready; see {log}")


def calls(sdk: AsyncShortlineClient, http: httpx.AsyncClient, url: str) -> dict[str, Call]:
    body = {"model": "replay", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}

    async def direct() -> None:
        stream = sdk.generate(PROMPT, model="replay", max_tokens=MAX_TOKENS, ignore_eos=True)
        await stream.collect()
        assert stream.result is not None and stream.result.actual_tokens == MAX_TOKENS

    async def whole() -> None:
        response = await http.post(f"{url}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS

    async def streamed() -> None:
        async with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            last = ""
            async for line in r.aiter_lines():
                last = line or last
            assert last == "data: [DONE]"

    return {"direct SDK": direct, "gateway": whole, "gateway, streamed": streamed}


async def latencies(named: dict[str, Call], requests: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(5):  # warm-up, not counted
        for call in named.values():
            await call()
    for i in range(requests):
        order = list(named) if i % 2 == 0 else list(named)[::-1]
        for name in order:
            started = time.perf_counter()
            await named[name]()
            out[name].append(time.perf_counter() - started)
    return out


async def throughput(call: Call, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {
        "n": float(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
    }


async def measure(scheduler: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    from shortline.client import ClientOptions

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=64)
    sdk = AsyncShortlineClient(ClientOptions(target=scheduler, timeout_seconds=60))
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        try:
            named = calls(sdk, http, url)
            raw = await latencies(named, args.requests)
            rates = {
                "gateway": await throughput(named["gateway"], args.concurrency, args.seconds),
                "direct SDK": await throughput(named["direct SDK"], args.concurrency, args.seconds),
            }
        finally:
            await sdk.close()
    stats = {name: summarize(values) for name, values in raw.items()}
    base = stats["direct SDK"]
    added = {
        name: {
            "p50_ms": s["p50_ms"] - base["p50_ms"],
            "p99_ms": s["p99_ms"] - base["p99_ms"],
        }
        for name, s in stats.items()
        if name != "direct SDK"
    }
    return {"latency": stats, "added": added, "requests_per_s": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150, help="sequential requests per path")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="per throughput run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        cfg = free_config(
            gateway=False,  # the benchmark starts and times its own gateway
            workers=1,
            slots=args.concurrency,
            replay_step_a_ms=1.0,
            replay_step_b_ms=0.0,
            triton_models="replay",
            log_dir=str(Path(tmp) / "logs"),
        )
        stack = Stack(cfg)
        os.environ.setdefault("SHORTLINE_JOURNAL_DIR", str(Path(tmp) / "journal"))
        stack.start()
        gateway = None
        try:
            gateway, url = start_gateway(stack.scheduler_address, Path(tmp) / "gateway.log")
            out = asyncio.run(measure(stack.scheduler_address, url, args))
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(10)
            stack.stop()
    out["settings"] = {
        "max_tokens": MAX_TOKENS,
        "replay_step_ms": 1.0,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
    }
    print(f"{'path':<20} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10}")
    for name, s in out["latency"].items():
        a = out["added"].get(name, {"p50_ms": 0.0, "p99_ms": 0.0})
        print(
            f"{name:<20} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
            f"{a['p50_ms']:>+10.2f} {a['p99_ms']:>+10.2f}"
        )
    for name, rate in out["requests_per_s"].items():
        print(f"requests/s, {args.concurrency} in flight, {name}: {rate:.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "gateway.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
