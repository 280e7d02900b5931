"""Top-level commands for users: ``up`` (the local stack), ``generate`` and ``stats``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from shortline.common.config import add_arguments, from_args


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from shortline.stack import StackConfig

    up = sub.add_parser(
        "up",
        help="start the whole stack as local processes (what `make run` does)",
        description="Starts Triton (smollm2 + replay), a predictor, the scheduler and workers "
        "on 127.0.0.1, waits until all are SERVING, restarts any that crashes (with backoff), "
        "and on Ctrl-C or SIGTERM stops them all: the scheduler first, draining its requests "
        "for up to --drain-grace-s, then the workers, the predictor and Triton. A second "
        "Ctrl-C ends the drain at once.",
    )
    add_arguments(up, StackConfig, "stack")
    up.set_defaults(func=_up)

    gen = sub.add_parser("generate", help="stream one answer from the scheduler")
    gen.add_argument("prompt")
    gen.add_argument("--scheduler", default="127.0.0.1:50051", help="scheduler address")
    gen.add_argument("--model", default="smollm2-135m-instruct")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default); 1 samples"
    )
    gen.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens")
    gen.add_argument("--length-model", default="", help="whose lengths the predictor predicts")
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _client_flags(gen)
    gen.set_defaults(func=_generate)

    stats = sub.add_parser("stats", help="print the scheduler's queue and worker state")
    stats.add_argument("--scheduler", default="127.0.0.1:50051", help="scheduler address")
    _client_flags(stats)
    stats.set_defaults(func=_stats)

    health = sub.add_parser(
        "health", help="exit 0 if a service's gRPC health check says SERVING (for probes)"
    )
    health.add_argument("address", help="HOST:PORT of any Shortline service")
    health.add_argument("--timeout", type=float, default=2.0)
    health.add_argument("--tls-ca", default="", help="PEM CA: check over TLS, verified by it")
    health.add_argument(
        "--tls-cert", default="", help="PEM certificate to present (services with mutual TLS)"
    )
    health.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    health.set_defaults(func=_health)

    from shortline.benchmark.config import BenchConfig

    bench = sub.add_parser(
        "bench",
        help="FCFS vs SSJF vs oracle on the live stack and in the simulator (issue 7)",
        description="Replays alpaca_eval prompts with their true lengths (replay model) at Azure "
        "trace arrivals rescaled to each load, for every policy and batching mode, against one "
        "live stack; then the simulator at the same settings and at scale, and sensitivity.",
    )
    add_arguments(bench, BenchConfig, "bench")
    bench.set_defaults(func=_bench)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls", action="store_true", help="TLS with the system's roots (--ca implies TLS)"
    )
    parser.add_argument(
        "--ca",
        default=None,
        metavar="FILE",
        help="PEM CA that signed the scheduler's certificate (turns TLS on)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token (prefer --token-file or SHORTLINE_TOKEN: flags show in `ps`)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="file holding the bearer token (default: $SHORTLINE_TOKEN, $SHORTLINE_TOKEN_FILE)",
    )


def _client_options(args: argparse.Namespace, **options: Any) -> Any:
    """The SDK's options from the client flags; SystemExit naming an unreadable file."""
    from shortline.client import ClientConfigError, ClientOptions

    try:
        return ClientOptions.from_files(
            args.scheduler,
            ca_file=args.ca,
            token_file=args.token_file,
            token=args.token,
            tls=args.tls,
            **options,
        )
    except ClientConfigError as exc:
        raise SystemExit(f"shortline {args.command}: {exc}") from exc


def _up(args: argparse.Namespace) -> int:
    from shortline.stack import Stack, StackConfig, StackError, check_ports

    cfg = from_args(StackConfig, args, "stack")
    stack = Stack(cfg)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            stack.hurry()  # asked again while stopping: end the drain now
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        check_ports(cfg)  # before writing anything
        for path in stack.prepare_credentials():
            print(f"wrote {path}", flush=True)
        print(f"starting {len(stack.children)} services; logs in {stack.log_dir}", flush=True)
        stack.start()
    except StackError as exc:
        print(f"shortline up: {exc}", file=sys.stderr)
        return 1
    flags = ""
    if cfg.tls:
        flags = f" --ca {cfg.certs_path() / 'ca.pem'}"
        token = cfg.token_path()
        if token is not None and token.exists():
            flags += f" --token-file {token}"
            print(f"TLS and mutual TLS on; the token of tenant dev is in {token}", flush=True)
    gateway = f"; OpenAI API: {stack.gateway_url}" if stack.gateway_url else ""
    print(
        f"Shortline is serving. Scheduler: {stack.scheduler_address}{gateway}\n"
        f"Try: shortline generate --scheduler {stack.scheduler_address}{flags} "
        '"Give me three tips for a good night\'s sleep." --max-tokens 64\n'
        "A service that crashes is restarted. Ctrl-C stops everything.",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print(
            f"stopping: the scheduler first (it drains for up to {cfg.drain_grace_s:g} s; "
            "Ctrl-C again to cut it short), then workers, predictor, Triton",
            flush=True,
        )
        stack.stop()
        print("stopped", flush=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from shortline.client import ShortlineClient

    with ShortlineClient(_client_options(args)) as client:
        stream = client.generate(
            args.prompt,
            model=args.model,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            length_model=args.length_model,
            timeout=args.timeout,
        )
        try:
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            stream.cancel()
            print("\ncancelled", file=sys.stderr)
            return 130
    print()
    result = stream.result
    if result is not None:
        print(
            f"[{result.finish_reason}] queue wait {result.queue_wait_seconds * 1000:.0f} ms, "
            f"first token {result.time_to_first_token_seconds * 1000:.0f} ms, "
            f"completion {result.completion_seconds:.2f} s, "
            f"tokens predicted {result.predicted_tokens:.0f} ({result.prediction_source}) "
            f"vs actual {result.actual_tokens}, preemptions {result.preemptions}, "
            f"worker {result.worker_id}",
            file=sys.stderr,
        )
    return 0


def _stats(args: argparse.Namespace) -> int:
    import grpc

    from shortline.client import ShortlineClient

    with ShortlineClient(_client_options(args, timeout_seconds=5)) as client:
        try:
            s = client.stats()
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"policy {s.policy}, batching {s.batching}")
    print(f"queue {s.queue_depth}, running {s.running}")
    print(
        f"completed {s.completed}, cancelled {s.cancelled}, failed {s.failed}, "
        f"preemptions {s.preemptions}, predictor fallbacks {s.predictor_fallbacks}, "
        f"cache hits {s.cache_hits}/{s.cache_lookups}"
    )
    if s.policy.startswith("ssjf-aging"):
        print(
            f"aging guard: {s.late_jobs} jobs reached their latest start, "
            f"token time {1e3 * s.token_time_seconds:.3f} ms per predicted token"
        )
    print(f"{'worker':<12} {'address':<22} {'slots':>9} {'alive':>6} {'heartbeat':>10}")
    for w in s.workers:
        print(
            f"{w.worker_id:<12} {w.address:<22} {w.slots_used:>4}/{w.slots_total:<4} "
            f"{'yes' if w.alive else 'no':>6} {w.seconds_since_heartbeat:>9.1f}s"
        )
    _print_accuracy(s.accuracy)
    return 0


def _print_accuracy(groups: Sequence[Any]) -> None:
    """The predictions' online accuracy: one row per length model, source and head."""
    if not groups:
        print("prediction accuracy: no finished request yet")
        return
    # gain: the share of the oracle's gain over a random order that the predictions'
    # order captures on the window, all queued at once (services/scheduler/core/accuracy.py);
    # replay: the share of the oracle's gain over fcfs the scheduler's policy captures on
    # the window replayed in the simulator (services/scheduler/sim/replay.py), "-" until
    # the first replay.
    print("prediction accuracy (each length model's last finished requests):")
    print(
        f"{'length model':<26} {'source':<9} {'head':<24} {'requests':>8} {'share':>6} "
        f"{'tau':>6} {'MAE':>7} {'bucket':>6} {'gain':>6} {'replay':>6}"
    )
    for g in groups:
        replayed = g.replayed_order_gain  # NaN (not equal to itself) until a replay
        print(
            f"{g.length_model:<26} {g.source:<9} {g.head:<24} {g.requests:>8} "
            f"{g.share:>6.0%} {g.kendall_tau:>6.3f} {g.mae_tokens:>7.1f} {g.bucket_accuracy:>6.0%} "
            f"{g.order_gain:>6.0%} {f'{replayed:.0%}' if replayed == replayed else '-':>6}"
        )


def _bench(args: argparse.Namespace) -> int:
    from shortline.benchmark.config import BenchConfig
    from shortline.benchmark.runner import main

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, through the code that stops
    # the stack this run started: otherwise Triton, the workers and their shared
    # memory would outlive the benchmark.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return main(from_args(BenchConfig, args, "bench"))
    except KeyboardInterrupt:
        print("shortline bench: interrupted; the stack it started is stopped", file=sys.stderr)
        return 130


def _health(args: argparse.Namespace) -> int:
    from shortline.common import tls
    from shortline.stack import grpc_serving

    material = tls.client_material(args.tls_ca, args.tls_cert, args.tls_key)
    if grpc_serving(args.address, timeout=args.timeout, material=material):
        print("SERVING")
        return 0
    print(f"{args.address} is not SERVING", file=sys.stderr)
    return 1
