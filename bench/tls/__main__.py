"""What TLS adds to one request's latency, with and without TLS in one run.

Run: ``.venv/bin/python -m bench.tls [--requests 300 --max-tokens 4]``.

Starts two local stacks side by side (``shortline up`` as real processes, one
worker, the ``replay`` model): one in plain text, one with ``--tls`` (TLS on
every listener, mutual TLS between the services, a bearer token checked on
every call). Requests alternate between the two, one at a time, so both see
the same machine load:

- **warm**: one SDK client per stack, its channel (and TLS session) kept:
  what a long-lived service calling Shortline pays per request;
- **new connection**: a fresh client per request, so the TLS handshake and
  certificate checks are inside the measurement: the worst case.

A request's latency is the client's wall time from the call to the final
message. Prints a table and writes ``bench/results/tls.json`` and ``tls.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shortline.client import ShortlineClient
from shortline.stack import Stack, StackConfig
from shortline.stack_plan import free_config

RESULTS = Path(__file__).resolve().parent.parent / "results"


def stack_config(tmp: Path, tls: bool, taken: set[int], step_ms: float) -> StackConfig:
    """Free ports for one stack, none shared with the other."""
    name = "tls" if tls else "plain"
    return free_config(
        taken,
        workers=1,
        slots=4,
        replay_step_a_ms=step_ms,
        replay_step_b_ms=0.0,
        triton_models="replay",
        log_dir=str(tmp / name / "logs"),
        tls=tls,
        certs_dir=str(tmp / "certs") if tls else "",
        tokens_file=str(tmp / name / "tokens.toml") if tls else "",
    )


def one_request(client: ShortlineClient, max_tokens: int) -> float:
    started = time.perf_counter()
    stream = client.generate(
        "Explain TLS in one sentence.", model="replay", max_tokens=max_tokens, ignore_eos=True
    )
    for _ in stream:
        pass
    elapsed = time.perf_counter() - started
    assert stream.result is not None and stream.result.actual_tokens == max_tokens
    return elapsed


def measure(
    stacks: dict[str, Stack], requests: int, max_tokens: int, fresh: bool
) -> dict[str, list[float]]:
    """Latencies (s) per stack, requests alternating between the stacks."""
    clients: dict[str, ShortlineClient] = {}
    if not fresh:
        clients = {
            n: ShortlineClient(s.client_options(timeout_seconds=60)) for n, s in stacks.items()
        }
    out: dict[str, list[float]] = {n: [] for n in stacks}
    names = list(stacks)
    try:
        for _ in range(3):  # warm-up, not counted
            for n in names:
                with ShortlineClient(stacks[n].client_options(timeout_seconds=60)) as c:
                    one_request(c, max_tokens)
        for i in range(requests):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                if fresh:
                    with ShortlineClient(stacks[n].client_options(timeout_seconds=60)) as c:
                        out[n].append(one_request(c, max_tokens))
                else:
                    out[n].append(one_request(clients[n], max_tokens))
    finally:
        for c in clients.values():
            c.close()
    return out


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {
        "n": float(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def plot(raw: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(raw), figsize=(5 * len(raw), 3.6))
    for ax, (mode, series) in zip(np.atleast_1d(axes), raw.items(), strict=True):
        for name, values in series.items():
            xs = np.sort(np.asarray(values) * 1e3)
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=name)
        ax.set_title(mode)
        ax.set_xlabel("request latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="per stack and mode")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=2.0, help="replay decoding step")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shortline-bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        taken: set[int] = set()
        stacks = {
            "plain": Stack(stack_config(tmp, False, taken, args.step_ms)),
            "tls": Stack(stack_config(tmp, True, taken, args.step_ms)),
        }
        started: list[Stack] = []
        try:
            for s in stacks.values():
                try:
                    s.start()
                except Exception:
                    for log in sorted(s.log_dir.glob("*.log")):
                        print(
                            f"--- {log.name} (last lines)\n"
                            + "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                        )
                    raise
                started.append(s)
            modes: dict[str, Callable[[], dict[str, list[float]]]] = {
                "warm channel": lambda: measure(
                    stacks, args.requests, args.max_tokens, fresh=False
                ),
                "new connection": lambda: measure(
                    stacks, max(args.requests // 3, 20), args.max_tokens, fresh=True
                ),
            }
            raw = {mode: run() for mode, run in modes.items()}
        finally:
            for s in reversed(started):
                s.stop()
    rows: list[dict[str, Any]] = []
    print(f"{'channel':<16}{'stack':<8}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for mode, series in raw.items():
        stats = {name: summarize(v) for name, v in series.items()}
        for name, st in stats.items():
            rows.append({"channel": mode, "stack": name, **st})
            print(
                f"{mode:<16}{name:<8}{int(st['n']):>6}{st['p50_ms']:>10.2f}"
                f"{st['p99_ms']:>10.2f}{st['mean_ms']:>10.2f}"
            )
        added = {k: stats["tls"][k] - stats["plain"][k] for k in ("p50_ms", "p99_ms", "mean_ms")}
        rows.append({"channel": mode, "stack": "tls - plain", **added})
        print(
            f"{mode:<16}{'added':<8}{'':>6}{added['p50_ms']:>10.2f}"
            f"{added['p99_ms']:>10.2f}{added['mean_ms']:>10.2f}"
        )
    report = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "replay_step_ms": args.step_ms,
        "rows": rows,
        "latencies_s": raw,
    }
    (out / "tls.json").write_text(json.dumps(report, indent=1))
    plot(raw, out / "tls.png")
    print(f"wrote {out / 'tls.json'} and {out / 'tls.png'}")


if __name__ == "__main__":
    main()
