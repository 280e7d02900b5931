"""What the admission journal adds to streaming latency, journal on and off in one run.

Run: ``.venv/bin/python -m bench.journal [--streams 16 --tokens 200 --rounds 10]``
(``--quick``: the CI size, under 40 s).

The journal is write-ahead (``services/scheduler/service/journal.py``): a
request's text reaches its client only after the SQLite commit that holds it,
one commit per event-loop turn. So whatever it costs is paid on the path of
every delta, and the issue asks for it to be measured, not assumed small.

Starts two local stacks side by side (``shortline up`` as real processes, the
``replay`` model, 2 workers x 8 slots): one with the journal (the default; its
file in this run's temporary folder, or ``--journal-dir``) and one with
``--journal off``. Each round sends ``--streams`` concurrent streams to one
stack, then the same to the other, the order alternating from round to round,
so both see the same machine load (other work on the machine included) and
neither always runs first after the other's burst.

Measured at the client (wall time, one asyncio client per stack):

- **TTFT**: from the call to the first text delta (admission, prediction and
  first delta each wait for a commit when the journal is on);
- **gap**: between consecutive deltas of one stream (a commit's delay shows
  here on every token);
- **completion**: from the call to the stream's end.

And at the journaled scheduler (its Prometheus histograms, the difference of a
scrape before and after the measured rounds, so the warm-up is left out):
commits, the commit time and the delay a change waits for its commit, p50 and
p99 interpolated within the histogram's buckets (so as coarse as they are),
and the means (exact, from the sums). The unjournaled scheduler's commit count
is reported too: it must be 0, or the "off" arm was not off.

Prints a table and writes ``bench/results/journal.json`` and ``journal.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from shortline.client import AsyncShortlineClient
from shortline.stack import Stack, StackConfig
from shortline.stack_plan import free_config

RESULTS = Path(__file__).resolve().parent.parent / "results"
ARMS = ("on", "off")  # journal on (the default), --journal off
HISTOGRAMS = {
    "commit": "shortline_journal_commit_seconds",
    "delay": "shortline_journal_delay_seconds",
}
ERRORS = "shortline_journal_errors"  # the counter's family name (samples end in _total)
PROMPT = "Tell me about write-ahead logs."
QUICK = {"streams": 16, "tokens": 40, "rounds": 2}
DEFAULT = {"streams": 16, "tokens": 200, "rounds": 10}


def stack_config(
    tmp: Path, arm: str, taken: set[int], step_a_ms: float, step_b_ms: float, journal_dir: Path
) -> StackConfig:
    """Free ports for one stack (workers at base+1.., metrics at base+3..), none shared with
    the other stack; its own outcome log, so the two schedulers never share a SQLite file."""
    journal = "off" if arm == "off" else str(journal_dir / f"{arm}.journal.sqlite")
    (tmp / arm).mkdir(parents=True, exist_ok=True)
    return free_config(
        taken,
        workers=2,
        slots=8,
        replay_step_a_ms=step_a_ms,
        replay_step_b_ms=step_b_ms,
        triton_models="replay",
        log_dir=str(tmp / arm / "logs"),
        extra_scheduler_args=(f"--outcome-log {tmp / arm / 'outcomes.sqlite'} --journal {journal}"),
    )


def fs_type(path: Path) -> str:
    """The filesystem the journal is on (a commit on tmpfs costs less than on a disk)."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


# ---- client side -------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    ttft_s: float
    gaps_s: list[float]
    completion_s: float
    deltas: int
    tokens: int


async def one_stream(client: AsyncShortlineClient, tokens: int) -> Timing:
    started = time.perf_counter()
    stream = client.generate(PROMPT, model="replay", max_tokens=tokens, ignore_eos=True)
    times: list[float] = []
    async for _ in stream:
        times.append(time.perf_counter())
    done = time.perf_counter()
    result = stream.result
    if result is None or result.actual_tokens != tokens or not times:
        raise RuntimeError(f"stream {stream.request_id} ended short: {result}")
    return Timing(
        ttft_s=times[0] - started,
        gaps_s=[b - a for a, b in itertools.pairwise(times)],
        completion_s=done - started,
        deltas=len(times),
        tokens=result.actual_tokens,
    )


async def one_round(client: AsyncShortlineClient, streams: int, tokens: int) -> list[Timing]:
    return list(await asyncio.gather(*(one_stream(client, tokens) for _ in range(streams))))


# ---- server side -------------------------------------------------------------------


@dataclasses.dataclass
class Hist:
    """A Prometheus histogram: cumulative counts per upper bound, count and sum."""

    buckets: dict[float, float]
    count: float
    sum: float

    def minus(self, other: Hist) -> Hist:
        return Hist(
            {le: c - other.buckets.get(le, 0.0) for le, c in self.buckets.items()},
            self.count - other.count,
            self.sum - other.sum,
        )

    def per_bucket(self) -> dict[str, int]:
        """Observations per bucket, keyed by its upper bound in ms (the tail, exactly)."""
        out: dict[str, int] = {}
        below = 0.0
        for le, cum in sorted(self.buckets.items()):
            out["inf" if math.isinf(le) else f"{le * 1e3:g}"] = int(cum - below)
            below = cum
        return out

    def quantile(self, q: float) -> float | None:
        """As PromQL's histogram_quantile: linear within the bucket the rank falls in;
        in the +Inf bucket, the highest finite bound."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cum in sorted(self.buckets.items()):
            if cum >= rank:
                if math.isinf(le):
                    return lower
                if cum <= below:
                    return le
                return lower + (le - lower) * (rank - below) / (cum - below)
            lower, below = le, cum
        return lower


Scrape = tuple[dict[str, Hist], float]


def scrape(port: int) -> Scrape:
    """The journal's histograms and error count from a scheduler's metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    hists: dict[str, Hist] = {}
    errors = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == ERRORS:
            errors = sum(s.value for s in family.samples if s.name.endswith("_total"))
        for key, name in HISTOGRAMS.items():
            if family.name != name:
                continue
            h = Hist({}, 0.0, 0.0)
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    h.buckets[float(s.labels["le"])] = s.value
                elif s.name.endswith("_count"):
                    h.count = s.value
                elif s.name.endswith("_sum"):
                    h.sum = s.value
            hists[key] = h
    missing = set(HISTOGRAMS) - set(hists)
    if missing:
        raise RuntimeError(f"scheduler metrics on port {port} lack {sorted(missing)}")
    return hists, errors


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def server_figures(before: Scrape, after: Scrape) -> dict[str, Any]:
    """What one scheduler's journal did between two scrapes."""
    out: dict[str, Any] = {"errors": after[1] - before[1]}
    for key in HISTOGRAMS:
        h = after[0][key].minus(before[0][key])
        out[key] = {
            "count": int(h.count),
            "p50_ms": _ms(h.quantile(0.50)),
            "p99_ms": _ms(h.quantile(0.99)),
            "mean_ms": h.sum / h.count * 1e3 if h.count else None,
            "per_bucket": h.per_bucket(),
        }
    out["commits"] = out["commit"]["count"]
    out["commit_total_s"] = after[0]["commit"].sum - before[0]["commit"].sum
    return out


# ---- the run -----------------------------------------------------------------------


async def measure(
    stacks: dict[str, Stack], streams: int, tokens: int, rounds: int, pause_s: float
) -> tuple[dict[str, list[list[Timing]]], dict[str, dict[str, Any]]]:
    """Client timings per arm and round (rounds alternating which arm goes first) and what each
    scheduler's journal did over the measured rounds."""
    clients = {
        arm: AsyncShortlineClient(s.client_options(timeout_seconds=300))
        for arm, s in stacks.items()
    }
    out: dict[str, list[list[Timing]]] = {arm: [] for arm in ARMS}
    try:
        for arm in ARMS:  # warm-up (channels, first dispatches), not counted
            await one_round(clients[arm], streams, min(tokens, 16))
        ports = {arm: stacks[arm].cfg.metrics_base_port for arm in ARMS}
        before = {arm: scrape(port) for arm, port in ports.items()}
        for r in range(rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                # A burst right after the other stack's: let the machine settle first, so
                # that which arm runs second matters less (the order alternates as well).
                await asyncio.sleep(pause_s)
                out[arm].append(await one_round(clients[arm], streams, tokens))
        after = {arm: scrape(port) for arm, port in ports.items()}
    finally:
        for c in clients.values():
            await c.close()
    return out, {arm: server_figures(before[arm], after[arm]) for arm in ARMS}


FIGURES = ("ttft", "gap", "completion")
LABELS = {"ttft": "TTFT", "gap": "inter-delta gap", "completion": "completion"}


def values(timings: list[Timing]) -> dict[str, np.ndarray]:
    """Seconds per figure: one TTFT and completion per stream, every gap of every stream."""
    return {
        "ttft": np.asarray([t.ttft_s for t in timings]),
        "gap": np.asarray([g for t in timings for g in t.gaps_s]),
        "completion": np.asarray([t.completion_s for t in timings]),
    }


def round_rows(per_round: dict[str, list[list[Timing]]]) -> list[dict[str, Any]]:
    """Each round's figures per arm: a disturbance from outside (other work on the machine)
    shows as one round off, where a cost of the journal shows in every round."""
    rows: list[dict[str, Any]] = []
    for i in range(len(per_round[ARMS[0]])):
        row: dict[str, Any] = {"round": i, "first": ARMS[i % 2]}
        for arm in ARMS:
            v = values(per_round[arm][i])
            row[arm] = {
                "ttft_p50_ms": float(np.percentile(v["ttft"], 50)) * 1e3,
                "ttft_p99_ms": float(np.percentile(v["ttft"], 99)) * 1e3,
                "gap_p50_ms": float(np.percentile(v["gap"], 50)) * 1e3,
                "gap_p99_ms": float(np.percentile(v["gap"], 99)) * 1e3,
                "completion_max_ms": float(v["completion"].max()) * 1e3,
            }
        rows.append(row)
    return rows


def client_rows(raw: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for fig in FIGURES:
        for p in (50, 99):
            on, off = (float(np.percentile(raw[arm][fig], p)) * 1e3 for arm in ARMS)
            rows.append(
                {
                    "figure": fig,
                    "percentile": p,
                    "on_ms": on,
                    "off_ms": off,
                    "ratio": on / off if off > 0 else None,
                    "added_ms": on - off,
                }
            )
    return rows


def print_table(
    rows: list[dict[str, Any]], server: dict[str, dict[str, Any]], counts: dict[str, Any]
) -> None:
    print(f"{'client':<22}{'on ms':>10}{'off ms':>10}{'on/off':>9}{'added ms':>10}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        print(
            f"{LABELS[r['figure']] + ' p' + str(r['percentile']):<22}{r['on_ms']:>10.2f}"
            f"{r['off_ms']:>10.2f}{ratio:>9}{r['added_ms']:>10.2f}"
        )
    for arm in ARMS:
        c = counts[arm]
        print(f"  journal {arm}: {c['streams']} streams, {c['deltas']} deltas, {c['gaps']} gaps")
    on = server["on"]
    per = counts["on"]["deltas"] / on["commits"] if on["commits"] else float("nan")
    print(
        f"journaled scheduler: {on['commits']} commits ({per:.1f} client deltas per commit), "
        f"{on['commit_total_s']:.2f} s in all, {on['errors']:.0f} errors; "
        f"unjournaled scheduler: {server['off']['commits']} commits"
    )
    print(f"{'server (journal on)':<22}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for key, label in (("commit", "commit time"), ("delay", "delay to commit")):
        f = on[key]
        cells = [
            f"{v:>10.3f}" if v is not None else f"{'-':>10}"
            for v in (f["p50_ms"], f["p99_ms"], f["mean_ms"])
        ]
        print(f"{label:<22}{''.join(cells)}")


def plot(raw: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FIGURES), figsize=(5 * len(FIGURES), 3.6))
    for ax, name in zip(axes, FIGURES, strict=True):
        for arm in ARMS:
            xs = np.sort(raw[arm][name]) * 1e3
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=f"journal {arm}")
        ax.set_title(LABELS[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction")
        if name == "gap":
            ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_both(stacks: dict[str, Stack]) -> None:
    """Starts the two stacks at once (start-up is mostly waiting for Triton); a stack
    that fails stops itself, the other is stopped here."""
    with ThreadPoolExecutor(len(stacks)) as pool:
        futures = {arm: pool.submit(s.start) for arm, s in stacks.items()}
        failed = {arm: f.exception() for arm, f in futures.items() if f.exception()}
    if failed:
        for arm, s in stacks.items():
            if arm not in failed:
                s.stop()
            for log in sorted(s.log_dir.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-8:]
                print(f"--- {arm}/{log.name} (last lines)\n" + "\n".join(tail))
        raise next(iter(failed.values())) or RuntimeError("start failed")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"CI size: {QUICK}")
    parser.add_argument("--streams", type=int, help=f"concurrent streams ({DEFAULT['streams']})")
    parser.add_argument("--tokens", type=int, help=f"tokens per stream ({DEFAULT['tokens']})")
    parser.add_argument("--rounds", type=int, help=f"rounds per arm ({DEFAULT['rounds']})")
    parser.add_argument("--step-a-ms", type=float, default=10.0, help="replay step: fixed ms")
    parser.add_argument("--step-b-ms", type=float, default=1.0, help="replay step: ms per seq")
    parser.add_argument("--pause-s", type=float, default=0.5, help="between two bursts")
    parser.add_argument("--journal-dir", default="", help="journal's folder (default: temp)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else DEFAULT)
    for key in size:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shortline-bench-journal-") as tmp_name:
        tmp = Path(tmp_name)
        journal_dir = Path(args.journal_dir) if args.journal_dir else tmp
        journal_dir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        stacks = {
            arm: Stack(stack_config(tmp, arm, taken, args.step_a_ms, args.step_b_ms, journal_dir))
            for arm in ARMS
        }
        start_both(stacks)
        startup_s = time.monotonic() - wall
        print(f"both stacks SERVING in {startup_s:.1f} s")
        try:
            per_round, server = asyncio.run(
                measure(stacks, size["streams"], size["tokens"], size["rounds"], args.pause_s)
            )
        finally:
            for s in stacks.values():
                s.stop()
    timings = {arm: [t for r in per_round[arm] for t in r] for arm in ARMS}
    raw = {arm: values(timings[arm]) for arm in ARMS}
    rounds = round_rows(per_round)
    rows = client_rows(raw)
    counts = {
        arm: {
            "streams": len(timings[arm]),
            "deltas": sum(t.deltas for t in timings[arm]),
            "tokens": sum(t.tokens for t in timings[arm]),
            "gaps": int(raw[arm]["gap"].size),
        }
        for arm in ARMS
    }
    print_table(rows, server, counts)
    for fig in ("ttft", "gap"):
        for arm in ARMS:
            per = " ".join(f"{r[arm][fig + '_p99_ms']:.0f}" for r in rounds)
            print(f"{LABELS[fig]} p99 per round, journal {arm} (ms): {per}")
    pcts = [1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]
    report = {
        **size,
        "workers": 2,
        "slots": 8,
        "replay_step_ms": [args.step_a_ms, args.step_b_ms],
        "pause_s": args.pause_s,
        "journal_fs": fs_type(journal_dir),
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - wall, 1),
        "startup_s": round(startup_s, 1),
        "arms": counts,
        "client": rows,
        "server": server,
        "ttft_s": {arm: raw[arm]["ttft"].tolist() for arm in ARMS},
        "completion_s": {arm: raw[arm]["completion"].tolist() for arm in ARMS},
        "rounds_detail": rounds,
        "gap_percentiles_ms": {
            arm: {str(p): float(np.percentile(raw[arm]["gap"], p)) * 1e3 for p in pcts}
            for arm in ARMS
        },
    }
    (out / "journal.json").write_text(json.dumps(report, indent=1))
    plot(raw, out / "journal.png")
    print(f"wrote {out / 'journal.json'} and {out / 'journal.png'} in {report['wall_s']} s")
    return report


if __name__ == "__main__":
    main()
