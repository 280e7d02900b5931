"""Worker benchmark: SmolLM2 throughput, replay step fidelity, worker+Triton overhead.

Starts a real embedded Triton (both models) and a worker as its own process
(``shortline worker serve --triton ...``), then measures through real gRPC:

1. smollm2 aggregate tokens/s at 1, 4 and 8 concurrent requests (64 tokens
   each, greedy, ignore_eos), through the worker. Target: >= 120 at 8.
2. replay: achieved step time (median gap between a request's deltas, seen
   by the client) against the configured a + b * batch, at 1, 8 and 32
   concurrent requests.
3. overhead per token of worker + Triton: a second Triton whose replay steps
   cost nothing (a = b = 0), so a request's time per token is pure transport
   and bookkeeping: direct tritonclient vs through the worker, and the
   difference (what the worker adds). Target: <= 1 ms per token.

    .venv/bin/python -m bench.worker [--smollm2-tokens 64] [--smollm2-precision bf16]
        [--replay-tokens 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.worker.config import REPLAY, SMOLLM2, TritonServeConfig
from services.worker.service.triton_client import TritonClient
from services.worker.triton.embedded import EmbeddedTriton
from shortline.common.net import free_port
from shortline.common.v1 import common_pb2
from shortline.worker.v1 import worker_pb2, worker_pb2_grpc

RESULTS = Path(__file__).resolve().parent.parent / "results"
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "Describe a good breakfast.",
    "How do airplanes stay in the air?",
    "Summarise the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
]


class Worker:
    """``shortline worker serve`` as a separate process."""

    def __init__(self, triton_url: str, slots: int) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "shortline.cli", "--log-level", "WARNING", "worker", "serve"]
        cmd += ["--triton", triton_url, "--port", str(self.port), "--slots", str(slots)]
        self.proc = subprocess.Popen(cmd)

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError("worker did not become SERVING")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_job(
    stub: Any, job_id: str, model: str, prompt: str, max_tokens: int
) -> dict[str, Any]:
    sampling = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)
    request = worker_pb2.ExecuteRequest(
        job_id=job_id, model=model, prompt=prompt, max_tokens=max_tokens, sampling=sampling
    )
    start = time.perf_counter()
    times: list[float] = []
    steps: list[int] = []
    tokens = 0
    async for msg in stub.Execute(request):
        if msg.HasField("delta"):
            times.append(time.perf_counter())
            steps.append(msg.delta.step)
            tokens += msg.delta.tokens
    end = time.perf_counter()
    return {"start": start, "end": end, "times": times, "steps": steps, "tokens": tokens}


async def concurrent(
    stub: Any, model: str, n: int, max_tokens: int, tag: str
) -> tuple[float, list[dict[str, Any]]]:
    start = time.perf_counter()
    jobs = await asyncio.gather(
        *[
            run_job(stub, f"{tag}-{n}-{i}", model, PROMPTS[i % len(PROMPTS)], max_tokens)
            for i in range(n)
        ]
    )
    return time.perf_counter() - start, list(jobs)


async def bench_smollm2(stub: Any, tokens: int) -> list[dict[str, Any]]:
    rows = []
    await concurrent(stub, SMOLLM2, 2, 8, "warm")
    for n in (1, 4, 8):
        wall, jobs = await concurrent(stub, SMOLLM2, n, tokens, "s")
        total = sum(j["tokens"] for j in jobs)
        ttft = statistics.mean(j["times"][0] - j["start"] for j in jobs)
        rows.append(
            {
                "concurrent": n,
                "tokens": total,
                "seconds": wall,
                "tokens_per_s": total / wall,
                "per_request_tokens_per_s": statistics.mean(
                    j["tokens"] / (j["end"] - j["start"]) for j in jobs
                ),
                "ttft_s": ttft,
            }
        )
    return rows


async def bench_replay(stub: Any, tokens: int, a_ms: float, b_ms: float) -> list[dict[str, Any]]:
    rows = []
    for n in (1, 8, 32):
        wall, jobs = await concurrent(stub, REPLAY, n, tokens, "r")
        gaps = [
            (t2 - t1) * 1000
            for j in jobs
            for t1, t2 in zip(j["times"], j["times"][1:], strict=False)
        ]
        configured = a_ms + b_ms * n
        rows.append(
            {
                "concurrent": n,
                "configured_step_ms": configured,
                "achieved_step_ms_median": statistics.median(gaps),
                "achieved_step_ms_mean": statistics.mean(gaps),
                "achieved_step_ms_p99": sorted(gaps)[int(0.99 * (len(gaps) - 1))],
                "error_pct": 100 * (statistics.mean(gaps) - configured) / configured,
                "seconds": wall,
            }
        )
    return rows


async def direct_job(client: TritonClient, max_tokens: int) -> float:
    start = time.perf_counter()
    stream = await client.stream(REPLAY, "x", {"max_tokens": max_tokens})
    tokens = 0
    async for chunk in stream:
        tokens += chunk.tokens
    assert tokens == max_tokens, tokens
    return time.perf_counter() - start


async def bench_overhead(stub: Any, triton_url: str, tokens: int) -> list[dict[str, Any]]:
    client = TritonClient(triton_url)
    rows = []
    try:
        for n in (1, 8):
            await direct_job(client, 10)
            start = time.perf_counter()
            await asyncio.gather(*[direct_job(client, tokens) for _ in range(n)])
            direct = (time.perf_counter() - start) / tokens * 1000
            await concurrent(stub, REPLAY, 1, 10, "ow")
            wall, _ = await concurrent(stub, REPLAY, n, tokens, "o")
            via = wall / tokens * 1000
            rows.append(
                {
                    "concurrent": n,
                    "direct_triton_ms_per_step": direct,
                    "via_worker_ms_per_step": via,
                    "direct_triton_ms_per_token": direct / n,
                    "via_worker_ms_per_token": via / n,
                    "worker_adds_ms_per_token": (via - direct) / n,
                }
            )
    finally:
        await client.close()
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "replay_step_a_ms": args.step_a_ms,
        "replay_step_b_ms": args.step_b_ms,
        "smollm2_precision": args.smollm2_precision,
        # Other processes share the two cores; the figures mean little without it.
        "load_average_at_start": list(os.getloadavg()),
    }
    cfg = TritonServeConfig(
        replay_step_a_ms=args.step_a_ms,
        replay_step_b_ms=args.step_b_ms,
        smollm2_precision=args.smollm2_precision,
    )
    with EmbeddedTriton(cfg) as triton:
        worker = Worker(triton.grpc_url, slots=32)
        try:
            await worker.wait_serving()
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                results["smollm2"] = await bench_smollm2(stub, args.smollm2_tokens)
                results["load_average_after_smollm2"] = list(os.getloadavg())
                results["replay"] = await bench_replay(
                    stub, args.replay_tokens, args.step_a_ms, args.step_b_ms
                )
        finally:
            worker.stop()
    zero = TritonServeConfig(models=REPLAY, replay_step_a_ms=0.0, replay_step_b_ms=0.0)
    with EmbeddedTriton(zero) as triton:
        worker = Worker(triton.grpc_url, slots=32)
        try:
            await worker.wait_serving()
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                results["overhead"] = await bench_overhead(
                    stub, triton.grpc_url, args.overhead_tokens
                )
        finally:
            worker.stop()
    return results


def render(results: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in results["load_average_at_start"])
    lines = [
        f"smollm2-135m-instruct ({results['smollm2_precision']}) through the worker "
        f"(greedy, ignore_eos); load average before the run: {load}",
        "",
    ]
    lines.append("| concurrent | tokens | seconds | aggregate tok/s | per-request tok/s | TTFT s |")
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for r in results["smollm2"]:
        lines.append(
            f"| {r['concurrent']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r['per_request_tokens_per_s']:.1f} | {r['ttft_s']:.3f} |"
        )
    a, b = results["replay_step_a_ms"], results["replay_step_b_ms"]
    lines += ["", f"replay step time through the worker (a = {a} ms, b = {b} ms)", ""]
    lines.append("| concurrent | configured ms | median ms | mean ms | p99 ms | mean error |")
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for r in results["replay"]:
        lines.append(
            f"| {r['concurrent']} | {r['configured_step_ms']:.1f} "
            f"| {r['achieved_step_ms_median']:.2f} | {r['achieved_step_ms_mean']:.2f} "
            f"| {r['achieved_step_ms_p99']:.2f} | {r['error_pct']:+.1f}% |"
        )
    lines += [
        "",
        "worker + Triton overhead (replay with zero-cost steps: all time is overhead; "
        "a step gives one token to each concurrent request)",
        "",
    ]
    lines.append(
        "| concurrent | direct Triton ms/step | via worker ms/step "
        "| direct ms/token | via worker ms/token | worker adds ms/token |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for r in results["overhead"]:
        lines.append(
            f"| {r['concurrent']} | {r['direct_triton_ms_per_step']:.3f} "
            f"| {r['via_worker_ms_per_step']:.3f} | {r['direct_triton_ms_per_token']:.3f} "
            f"| {r['via_worker_ms_per_token']:.3f} | {r['worker_adds_ms_per_token']:+.3f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = results["smollm2"]
    left.bar([str(r["concurrent"]) for r in rows], [r["tokens_per_s"] for r in rows])
    left.axhline(120, color="red", linestyle="--", label="target at 8")
    left.set_xlabel("concurrent requests")
    left.set_ylabel("aggregate tokens/s")
    left.set_title("smollm2-135m-instruct via worker")
    left.legend()
    rows = results["replay"]
    xs = [r["concurrent"] for r in rows]
    right.plot(xs, [r["configured_step_ms"] for r in rows], "o--", label="configured a + b*n")
    right.plot(xs, [r["achieved_step_ms_median"] for r in rows], "s-", label="achieved (median)")
    right.set_xlabel("concurrent requests")
    right.set_ylabel("step time (ms)")
    right.set_title("replay step time via worker")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("--smollm2-tokens", type=int, default=64)
    parser.add_argument(
        "--smollm2-precision",
        choices=["bf16", "fp32", "int8"],
        default=TritonServeConfig.smollm2_precision,
    )
    parser.add_argument("--replay-tokens", type=int, default=100)
    parser.add_argument("--overhead-tokens", type=int, default=500)
    parser.add_argument("--step-a-ms", type=float, default=20.0)
    parser.add_argument("--step-b-ms", type=float, default=2.0)
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    table = render(results)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worker.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "worker.md").write_text(table + "\n")
    plot(results, RESULTS / "worker.png")
    print(f"\nwrote {RESULTS / 'worker.json'}")


if __name__ == "__main__":
    main()
