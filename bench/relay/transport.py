"""What reading one streamed Triton response costs, per way of reading it.

Run: ``.venv/bin/python -m bench.relay.transport`` (32 streams x 400 tokens per
way; ``--quick``: 8 x 100).

bench.relay found the worker's CPU per token unmoved by coalescing: it is spent
reading Triton's stream, one response per token, before any of the worker's own
logic. This isolates that read. One embedded Triton serves the ``replay`` model
at a fast step (2 ms + 0.05 ms per sequence); this process reads concurrent
streams of it three ways, one after the other, and its own CPU (``os.times``)
over each, divided by the responses read, is the cost per response:

- **grpc-aio**: ``ModelStreamInfer`` on a ``grpc.aio`` channel, responses parsed
  from their raw bytes (``services.worker.service.triton_client``: what the
  worker does today, minus everything after the read);
- **grpc-sync**: the same call on a blocking channel, one thread per stream;
- **http-sse**: Triton's HTTP ``generate_stream`` endpoint (server-sent events,
  one JSON object per response) read with plain asyncio streams.

Every stream must bring its exact token count or the run fails. Prints a table
and writes ``bench/results/relay_transport.json`` and ``relay_transport.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc

from services.worker.config import TritonServeConfig
from services.worker.service.triton_client import (
    TritonClient,
    bool_input,
    bytes_input,
    parse_response,
    stream_request,
)
from services.worker.triton.embedded import EmbeddedTriton

RESULTS = Path(__file__).resolve().parent.parent / "results"
QUICK = {"streams": 8, "tokens": 100}
DEFAULT = {"streams": 32, "tokens": 400}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _sampling(tokens: int) -> bytes:
    return json.dumps({"max_tokens": tokens, "ignore_eos": True}).encode()


async def _grpc_aio(triton: EmbeddedTriton, streams: int, tokens: int) -> list[tuple[int, int]]:
    client = TritonClient(triton.grpc_url)

    async def one(i: int) -> tuple[int, int]:
        stream = await client.stream(
            "replay", "go", {"max_tokens": tokens, "ignore_eos": True}, request_id=f"a{i}"
        )
        n = responses = 0
        async for chunk in stream:
            n += chunk.tokens
            responses += 1
        return n, responses

    try:
        return list(await asyncio.gather(*(one(i) for i in range(streams))))
    finally:
        await client.close()


def _grpc_sync(triton: EmbeddedTriton, streams: int, tokens: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    with grpc.insecure_channel(triton.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def one(i: int) -> None:
            inputs = [
                bytes_input("text_input", b"go"),
                bool_input("stream", True),
                bytes_input("sampling_parameters", _sampling(tokens)),
                bool_input("return_num_output_tokens", True),
            ]
            n = responses = 0
            request = stream_request("replay", f"s{i}", inputs)
            for response in stub.ModelStreamInfer(iter((request,))):
                chunk = parse_response(response.infer_response)
                n += chunk.tokens
                responses += 1
            # Read on to Triton's end of the call: a cancel after the final response
            # would leave the request in Triton (triton_client.py's docstring).
            out.append((n, responses))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


async def _http_sse(triton: EmbeddedTriton, streams: int, tokens: int) -> list[tuple[int, int]]:
    host, port = triton.http_url.rsplit(":", 1)
    body = json.dumps(
        {
            "text_input": "go",
            "stream": True,
            "sampling_parameters": _sampling(tokens).decode(),
            "return_num_output_tokens": True,
        }
    ).encode()
    head = (
        "POST /v2/models/replay/generate_stream HTTP/1.1\r\nHost: triton\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def one() -> tuple[int, int]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + body)
        n = responses = 0
        try:
            while n < tokens:
                line = await reader.readline()
                if not line:
                    break
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise RuntimeError(f"Triton: {event['error']}")
                    n += int(event.get("num_output_tokens", 1))
                    responses += 1
        finally:
            writer.close()
        return n, responses

    return list(await asyncio.gather(*(one() for _ in range(streams))))


def _measure(
    name: str, run: Callable[[], list[tuple[int, int]]], streams: int, tokens: int
) -> dict[str, Any]:
    run()  # warm-up: connections, imports, the model's first batch
    cpu, started = _cpu(), time.perf_counter()
    results = run()
    cpu, wall = _cpu() - cpu, time.perf_counter() - started
    counts = sorted(n for n, _ in results)
    if len(results) != streams or counts != [tokens] * streams:
        raise SystemExit(f"{name}: expected {streams} streams of {tokens} tokens, got {counts}")
    responses = sum(r for _, r in results)
    return {
        "way": name,
        "responses": responses,
        "tokens": sum(counts),
        "wall_s": wall,
        "tokens_per_s": sum(counts) / wall,
        "cpu_us_per_response": cpu * 1e6 / responses,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["way"] for r in rows], [r["cpu_us_per_response"] for r in rows])
    ax.set_ylabel("reader CPU us per Triton response")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay.transport")
    parser.add_argument("--quick", action="store_true", help="8 streams x 100 tokens")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    streams = args.streams or size["streams"]
    tokens = args.tokens or size["tokens"]
    triton = EmbeddedTriton(
        TritonServeConfig(models="replay", replay_step_a_ms=2.0, replay_step_b_ms=0.05)
    )
    triton.start()
    try:
        rows = [
            _measure(
                "grpc-aio",
                lambda: asyncio.run(_grpc_aio(triton, streams, tokens)),
                streams,
                tokens,
            ),
            _measure("grpc-sync", lambda: _grpc_sync(triton, streams, tokens), streams, tokens),
            _measure(
                "http-sse",
                lambda: asyncio.run(_http_sse(triton, streams, tokens)),
                streams,
                tokens,
            ),
        ]
    finally:
        triton.stop()
    print(f"{streams} concurrent streams x {tokens} tokens, one Triton response per token")
    print(f"{'way':<11}{'responses':>10}{'tok/s':>9}{'reader CPU us/response':>25}")
    for r in rows:
        print(
            f"{r['way']:<11}{r['responses']:>10}{r['tokens_per_s']:>9.0f}"
            f"{r['cpu_us_per_response']:>25.1f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relay_transport.json").write_text(
        json.dumps({"streams": streams, "tokens": tokens, "rows": rows}, indent=2)
    )
    plot(rows, out / "relay_transport.png")
    print(f"wrote {out / 'relay_transport.json'} and {out / 'relay_transport.png'}")


if __name__ == "__main__":
    main()
