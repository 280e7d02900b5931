"""Predictor latency and throughput, over real gRPC against ``shortline predictor serve``.

Run: ``.venv/bin/python -m bench.predictor [--clients 64 --seconds 10 --backend auto]``.
Starts the service as its own process (so client and server do not share a
GIL), then measures from ONE asyncio client process over ONE channel (the
load generator costs ~0.2 ms of CPU per request, so it leaves the cores to
the server):

- one prompt at a time, sequentially (p50/p99 latency of a lone request);
- ``--clients`` concurrent single-prompt calls in a closed loop (prompts/s;
  micro-batching is what makes this scale);
- the server's CPU time per prompt in each phase (from /proc), which holds
  when the machine is shared: ``2 s / CPU per prompt`` is the rate the server
  would sustain with both cores to itself. The 1-minute load average is
  printed with each phase, since other processes on the same 2 cores move the
  wall-clock figures a lot;
- finally each encoder backend in-process (one prompt p50; batch of 64
  prompts: prompts/s and CPU ms per prompt).

Prints a table and writes ``bench/results/predictor.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shortline.common import paths

RESULTS = Path(__file__).resolve().parent.parent / "results"
TARGET = "Meta-Llama-3-8B-Instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prompts() -> list[str]:
    file = paths.alpaca_eval_outputs(TARGET)
    if file.exists():
        return [r["instruction"] for r in json.loads(file.read_text())]
    return [f"Question {i}: explain topic number {i} briefly." for i in range(805)]


async def wait_serving(address: str, timeout_s: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"predictor at {address} not SERVING after {timeout_s} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return os.getloadavg()[0]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000.0


async def measure(
    address: str, texts: list[str], clients: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    import grpc

    from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

    out: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)

        async def one(text: str) -> float:
            t = time.perf_counter()
            await stub.Predict(predictor_pb2.PredictRequest(target_model=TARGET, prompts=[text]))
            return time.perf_counter() - t

        for text in texts[:20]:
            await one(text)
        load = load_average()
        server_cpu = cpu_seconds(server_pid)
        sequential = [await one(texts[i % len(texts)]) for i in range(300)]
        out["one_prompt"] = {
            "n": len(sequential),
            "p50_ms": pct(sequential, 50),
            "p99_ms": pct(sequential, 99),
            "server_cpu_ms_per_prompt": (cpu_seconds(server_pid) - server_cpu)
            / len(sequential)
            * 1000.0,
            "load_before": load,
        }

        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                latencies.append(await one(texts[i % len(texts)]))
                i += clients

        load = load_average()
        server_cpu = cpu_seconds(server_pid)
        client_cpu = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
        n = len(latencies)
        server_ms = (cpu_seconds(server_pid) - server_cpu) / n * 1000.0
        out["concurrent"] = {
            "clients": clients,
            "seconds": elapsed,
            "requests": n,
            "prompts_per_s": n / elapsed,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
            "server_cpu_ms_per_prompt": server_ms,
            "client_cpu_ms_per_prompt": (time.process_time() - client_cpu) / n * 1000.0,
            # Served rate if the server had both cores (no other load, client elsewhere).
            "capacity_prompts_per_s_2_cores": 2000.0 / server_ms,
            "load_before": load,
            "load_after": load_average(),
        }
        out["_latencies"] = {"sequential": sequential, "concurrent": latencies}
    return out


def encoder_latency(texts: list[str], threads: int) -> dict[str, Any]:
    from services.predictor.features.minilm import MiniLMEncoder
    from services.predictor.features.minilm_backends import BACKENDS, resolve_backend

    result: dict[str, Any] = {}
    variants = [("torch-fp32", "torch", "fp32"), ("torch-bf16", "torch", "bf16")]
    variants += [(b, b, "auto") for b in BACKENDS if b not in ("auto", "torch")]
    for name, backend, precision in variants:
        try:
            resolve_backend(backend)
        except RuntimeError:
            continue
        enc = MiniLMEncoder(precision=precision, threads=threads, backend=backend)
        enc.encode(texts[:64])
        for t in texts[200:220]:
            enc.encode([t])
        one = []
        for t in texts[:100]:
            s = time.perf_counter()
            enc.encode([t])
            one.append(time.perf_counter() - s)
        wall = time.perf_counter()
        cpu = time.process_time()
        for i in range(4):
            enc.encode(texts[64 * i : 64 * i + 64])
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        result[name] = {
            "one_p50_ms": pct(one, 50),
            "one_p99_ms": pct(one, 99),
            "batch64_prompts_per_s": 256 / wall,
            "batch64_cpu_ms_per_prompt": cpu / 256 * 1000.0,
            "load": load_average(),
        }
        del enc
    return result


def plot(latencies: dict[str, list[float]], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in latencies.items():
        xs = np.sort(np.asarray(values) * 1000.0)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("Predict latency (ms)")
    ax.set_ylabel("CDF")
    ax.set_title("shortline predictor, one prompt per request")
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predictor", description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="server torch threads")
    parser.add_argument("--batch-window-ms", type=float, default=3.0)
    parser.add_argument(
        "--backend",
        default="auto",
        help="server encoder backend: auto (onnx-int8), torch, hybrid, onnx, onnx-int8",
    )
    parser.add_argument("--skip-encoder", action="store_true")
    args = parser.parse_args(argv)

    from services.predictor.features.minilm_backends import resolve_backend

    texts = prompts()
    port = free_port()
    address = f"127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "shortline.cli", "--log-level", "WARNING", "predictor", "serve",
        "--port", str(port), "--threads", str(args.threads),
        "--batch-window-ms", str(args.batch_window_ms), "--backend", args.backend,
    ]  # fmt: skip
    server = subprocess.Popen(cmd, env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    try:
        asyncio.run(wait_serving(address))
        result = asyncio.run(measure(address, texts, args.clients, args.seconds, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    latencies = result.pop("_latencies")
    result["config"] = {
        "target_model": TARGET,
        "server_threads": args.threads,
        "batch_window_ms": args.batch_window_ms,
        "backend": args.backend,
        "backend_resolved": resolve_backend(args.backend),
        "cpus": os.cpu_count(),
    }
    if not args.skip_encoder:
        result["encoder_in_process"] = encoder_latency(texts, args.threads)

    one, conc = result["one_prompt"], result["concurrent"]
    print(f"server backend: {result['config']['backend_resolved']}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| one prompt over gRPC, p50 | {one['p50_ms']:.1f} ms |")
    print(f"| one prompt over gRPC, p99 | {one['p99_ms']:.1f} ms |")
    print(f"| one prompt, server CPU per request | {one['server_cpu_ms_per_prompt']:.1f} ms |")
    n = conc["clients"]
    print(f"| {n} concurrent clients, throughput | {conc['prompts_per_s']:.0f} prompts/s |")
    print(f"| {n} concurrent clients, p50 / p99 | {conc['p50_ms']:.0f} / {conc['p99_ms']:.0f} ms |")
    print(
        f"| {n} concurrent clients, server / client CPU per prompt | "
        f"{conc['server_cpu_ms_per_prompt']:.1f} / {conc['client_cpu_ms_per_prompt']:.1f} ms |"
    )
    print(
        f"| server capacity with 2 free cores (2 s / server CPU per prompt) | "
        f"{conc['capacity_prompts_per_s_2_cores']:.0f} prompts/s |"
    )
    print(
        f"| load average (1 min) before one-prompt / concurrent / after | "
        f"{one['load_before']:.2f} / {conc['load_before']:.2f} / {conc['load_after']:.2f} |"
    )
    for name, enc in result.get("encoder_in_process", {}).items():
        print(
            f"| encoder {name} in-process: one prompt p50; batch of 64: prompts/s, "
            f"CPU per prompt (load {enc['load']:.1f}) | {enc['one_p50_ms']:.1f} ms; "
            f"{enc['batch64_prompts_per_s']:.0f}/s, {enc['batch64_cpu_ms_per_prompt']:.1f} ms |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predictor.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(latencies, RESULTS / "predictor.png")
    print(f"wrote {RESULTS / 'predictor.json'} and {RESULTS / 'predictor.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
