"""What relaying a token costs each service, with the worker's coalescing off and on.

Run: ``.venv/bin/python -m bench.relay`` (64 streams x 400 tokens, 3 rounds per
setting); ``--quick``: the CI size (16 x 200, 1 round, under 45 s).

Every generated token travels Triton -> worker -> scheduler -> client. This
starts two local stacks side by side (``shortline up`` as real processes, the
``replay`` model at a fast step: 2 workers x 32 slots, 2 ms + 0.05 ms per
sequence, so the services, not the model, are the limit): one whose workers
send every token as its own message (``--coalesce-ms 0``) and one with the
worker's default coalescing (in both, the scheduler takes each worker's deltas
on one ``StreamDeltas`` stream, several jobs' per message). Rounds of
``--streams`` concurrent streams go to one stack, then the other, the order
alternating, so both see the same load on the machine (other work on it
included).

Per setting, over the measured rounds (a warm-up round is left out):

- **CPU us per token, per service**: ``utime + stime`` of each service's
  process tree from ``/proc`` (``procstat``), the difference over each
  round, divided by the tokens the clients received. ``worker`` is both
  workers together (each token passes one), ``triton`` is the server with
  its Python stubs, ``client`` this process (the asyncio SDK reading every
  stream);
- **tokens/s**: tokens received over the rounds' wall time;
- **TTFT**: call to first text, p50/p99 over all streams;
- **inter-chunk delay**: between consecutive pieces of text of one stream,
  p50/p99 over all of them, and the tokens per chunk the clients saw.

Every stream's text must be the exact replay of its length and its result
must count its tokens, or the run fails (coalescing may not change a
character). ``--profile-scheduler [off|on]`` also profiles that setting's
scheduler with py-spy (``profile``; its cost per message is per chunk the
clients received, one per token with coalescing off). Prints a table and writes
``bench/results/relay.json`` and ``relay.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.relay import load, procstat
from bench.relay import profile as prof
from shortline.stack import Stack, StackConfig
from shortline.stack_plan import free_config

RESULTS = Path(__file__).resolve().parent.parent / "results"
SETTINGS = ("off", "on")
SERVICES = ("scheduler", "worker", "triton", "predictor", "client")
QUICK = {"streams": 16, "tokens": 200, "rounds": 1}
DEFAULT = {"streams": 64, "tokens": 400, "rounds": 3}
WARMUP_TOKENS = 20


def worker_args(setting: str, on_ms: float | None, on_tokens: int | None) -> str:
    if setting == "off":
        return "--coalesce-ms 0"
    args = [] if on_ms is None else ["--coalesce-ms", str(on_ms)]
    args += [] if on_tokens is None else ["--coalesce-tokens", str(on_tokens)]
    return " ".join(args)


def stack_config(tmp: Path, setting: str, taken: set[int], args: argparse.Namespace) -> StackConfig:
    """Free ports for one stack, none shared with the other; its own journal and outcome
    log in this run's temporary folder (the scheduler journals, as deployed)."""
    return free_config(
        taken,
        gateway=False,  # the relay measured is gRPC's: client, scheduler, worker, Triton
        workers=args.workers,
        slots=args.slots,
        replay_step_a_ms=args.step_a_ms,
        replay_step_b_ms=args.step_b_ms,
        triton_models="replay",
        log_dir=str(tmp / setting / "logs"),
        extra_scheduler_args=(
            f"--outcome-log {tmp / setting / 'outcomes.sqlite'} "
            f"--journal {tmp / setting / 'journal.sqlite'} {args.scheduler_args}"
        ),
        extra_worker_args=worker_args(setting, args.coalesce_ms, args.coalesce_tokens),
    )


def service_roots(stack: Stack) -> dict[str, list[int]]:
    roots: dict[str, list[int]] = {s: [] for s in SERVICES if s != "client"}
    for child in stack.children:
        if child.process is not None:
            roots[child.name.split("-")[0]].append(child.process.pid)
    return roots


def start_all(stacks: dict[str, Stack]) -> None:
    """Starts the stacks together (each waits mostly on its own Triton and predictor)."""
    with ThreadPoolExecutor(len(stacks)) as pool:
        futures = {name: pool.submit(s.start) for name, s in stacks.items()}
    for name, future in futures.items():
        exc = future.exception()
        if exc is not None:
            for log in sorted(stacks[name].log_dir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-8:]
                print(f"--- {name} {log.name} (last lines)\n" + "\n".join(tail))
            raise exc


def measure(
    stack: Stack, streams: int, tokens: int, profiler: prof.Profiler | None
) -> tuple[load.Round, dict[str, float]]:
    """One round against ``stack``; the CPU each service spent during it."""
    roots = service_roots(stack)
    if profiler is not None:
        url = f"http://{stack.cfg.host}:{stack.cfg.metrics_base_port}/metrics"
        profiler.start(roots["scheduler"][0], url)
    before = procstat.snapshot(roots, os.getpid())
    rnd = asyncio.run(load.run_round(stack.scheduler_address, streams, tokens))
    after = procstat.snapshot(roots, os.getpid())
    if profiler is not None:
        profiler.stop()
    return rnd, procstat.delta(before, after)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


def summarize(rounds: list[tuple[load.Round, dict[str, float]]]) -> dict[str, Any]:
    tokens = sum(r.tokens for r, _ in rounds)
    wall = sum(r.wall_s for r, _ in rounds)
    streams = [s for r, _ in rounds for s in r.streams]
    ttft = [s.ttft_s for s in streams if s.ttft_s is not None]
    gaps = [g for s in streams for g in s.gaps_s]
    chunks = sum(s.chunks for s in streams)
    out: dict[str, Any] = {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "inter_chunk_p50_ms": pct(gaps, 50),
        "inter_chunk_p99_ms": pct(gaps, 99),
        "chunks": chunks,
        "tokens_per_chunk": tokens / chunks if chunks else 0.0,
    }
    for service in SERVICES:
        cpu = sum(c[service] for _, c in rounds)
        out[f"{service}_cpu_s"] = cpu
        out[f"{service}_cpu_us_per_token"] = cpu * 1e6 / tokens if tokens else 0.0
    out["_samples"] = {"ttft_ms": [t * 1e3 for t in ttft], "gap_ms": [g * 1e3 for g in gaps]}
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = (
        f"{'coalesce':<9}{'tokens':>8}{'tok/s':>8}"
        + "".join(f"{s[:6] + ' us':>10}" for s in SERVICES)
        + f"{'ttft p50':>10}{'p99':>8}{'chunk p50':>10}{'p99':>8}{'tok/chk':>8}"
    )
    print("CPU us per token relayed; latencies in ms at the client")
    print(head)
    for name, r in results.items():
        print(
            f"{name:<9}{r['tokens']:>8}{r['tokens_per_s']:>8.0f}"
            + "".join(f"{r[f'{s}_cpu_us_per_token']:>10.1f}" for s in SERVICES)
            + f"{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}"
            f"{r['inter_chunk_p50_ms']:>10.2f}{r['inter_chunk_p99_ms']:>8.2f}"
            f"{r['tokens_per_chunk']:>8.1f}"
        )


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, ttft, gaps) = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(SERVICES))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        values = [r[f"{s}_cpu_us_per_token"] for s in SERVICES]
        bars.bar(x + i * width, values, width, label=f"coalescing {name}")
        for ax, key in ((ttft, "ttft_ms"), (gaps, "gap_ms")):
            xs = np.sort(np.asarray(r["_samples"][key]))
            if xs.size:
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=f"coalescing {name}")
    bars.set_xticks(x + width * (len(results) - 1) / 2, SERVICES)
    bars.set_ylabel("CPU us per token relayed")
    bars.legend()
    ttft.set_xlabel("time to first token (ms)")
    gaps.set_xlabel("inter-chunk delay (ms)")
    gaps.set_xscale("log")
    for ax in (ttft, gaps):
        ax.set_ylabel("fraction")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    taken: set[int] = set()
    stacks = {s: Stack(stack_config(tmp, s, taken, args), say=lambda _: None) for s in SETTINGS}
    profiler = None
    if args.profile_scheduler:
        spy = prof.py_spy()
        if spy is None:
            raise SystemExit("--profile-scheduler needs py-spy (.venv/bin/pip install py-spy)")
        profiler = prof.Profiler(spy, tmp)
    problems: list[str] = []
    rounds: dict[str, list[tuple[load.Round, dict[str, float]]]] = {s: [] for s in SETTINGS}
    try:
        start_all(stacks)
        for stack in stacks.values():  # warm-up: channels, the predictor's first calls
            asyncio.run(load.run_round(stack.scheduler_address, args.streams, WARMUP_TOKENS))
        for i in range(args.rounds):
            for setting in SETTINGS if i % 2 == 0 else SETTINGS[::-1]:
                spied = profiler if setting == args.profile_scheduler else None
                rnd, cpu = measure(stacks[setting], args.streams, args.tokens, spied)
                rounds[setting].append((rnd, cpu))
                problems += [f"{setting} round {i}: {p}" for p in load.problems(rnd, args.tokens)]
        for name, stack in stacks.items():
            restarted = [c.name for c in stack.children if stack.restarts(c.name)]
            if restarted:
                problems.append(f"{name}: restarted during the run: {', '.join(restarted)}")
    finally:
        for stack in stacks.values():
            stack.stop()
    results = {s: summarize(rounds[s]) for s in SETTINGS}
    report: dict[str, Any] = {"results": results}
    if profiler is not None:
        spied_on = results[args.profile_scheduler]
        report["profile"] = profiler.analyse(spied_on["scheduler_cpu_s"], spied_on["chunks"])
        report["profile"]["setting"] = args.profile_scheduler
    return report, problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI size (under 45 s)")
    parser.add_argument("--streams", type=int, help="concurrent streams per round")
    parser.add_argument("--tokens", type=int, help="tokens per stream")
    parser.add_argument("--rounds", type=int, help="measured rounds per setting")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=32, help="per worker")
    parser.add_argument("--step-a-ms", type=float, default=2.0, help="replay: fixed per step")
    parser.add_argument("--step-b-ms", type=float, default=0.05, help="replay: per sequence")
    parser.add_argument("--coalesce-ms", type=float, help="the 'on' setting (worker default)")
    parser.add_argument("--coalesce-tokens", type=int, help="the 'on' setting (worker default)")
    parser.add_argument(
        "--profile-scheduler",
        nargs="?",
        const="off",
        choices=SETTINGS,
        help="py-spy that setting's scheduler (default: off)",
    )
    parser.add_argument(
        "--scheduler-args",
        default="",
        help="more scheduler flags for both settings, for experiments (e.g. '--journal off')",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    size = QUICK if args.quick else DEFAULT
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shortline-bench-relay-") as tmp:
        report, problems = run(args, Path(tmp))
    results = report["results"]
    print_table(results)
    if "profile" in report:
        prof.print_report(report["profile"])
    plot(results, out / "relay.png")
    for r in results.values():
        r.pop("_samples")
    document = {
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
        "workers": args.workers,
        "slots": args.slots,
        "replay_step_a_ms": args.step_a_ms,
        "replay_step_b_ms": args.step_b_ms,
        "worker_args": {
            s: worker_args(s, args.coalesce_ms, args.coalesce_tokens) for s in SETTINGS
        },
        "scheduler_args": args.scheduler_args,
        "profiled": bool(args.profile_scheduler),
        "settings": results,
        "problems": problems,
        **({"profile": report["profile"]} if "profile" in report else {}),
    }
    (out / "relay.json").write_text(json.dumps(document, indent=1))
    print(f"wrote {out / 'relay.json'} and {out / 'relay.png'}")
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
