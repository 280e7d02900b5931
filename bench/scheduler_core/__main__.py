"""One scheduling decision at 100k queued jobs, per policy (target <= 50 us).

A decision is the steady-state cycle through SchedulerCore with the queue held
at N jobs: a new job is submitted and predicted (push), the running job
finishes, and ``dispatch`` picks the next (pop, placement). Also timed: a
cancel of a queued job (lazy deletion) and the bare queue push+pop. The
"bands" rows spread the jobs over 4 priority bands and 8 tenants with fair
share on (issue 19): the wait bound's FIFOs, the tenant heaps and the ledger
are all on the path. The distribution-aware rows (ssjf-risk, ssjf-gittins, issue 19)
give every job a predicted length distribution (quantiles of a log-normal around its
point), which the core builds when the prediction arrives, inside the timed decision.

    .venv/bin/python -m bench.scheduler_core [--queued 100000] [--iterations 20000]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from services.scheduler.core.bands import BandedQueue, BandSettings
from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.clock import VirtualClock
from services.scheduler.core.job import Job
from services.scheduler.core.policies import make_policy
from services.scheduler.core.scheduler import SchedulerCore
from shortline.common.length_distribution import LengthDistribution, lognormal_quantiles

RESULTS = Path(__file__).resolve().parent.parent / "results"


class Settings(TypedDict, total=False):
    aging_rate: float
    max_wait_s: float
    jct_target_s: float
    token_time_s: float


# (row label, policy spec, make_policy settings). ssjf-aging is timed three ways: as
# served (JCT-target guard, no job late yet), in a burst where every queued job is
# already past its latest start (the guard's heaviest case), and with the older
# hard wait bound.
VARIANTS: tuple[tuple[str, str, Settings], ...] = (
    ("fcfs", "fcfs", {}),
    ("ssjf", "ssjf", {}),
    ("ssjf-aging", "ssjf-aging", {"jct_target_s": 120.0, "aging_rate": 1.0}),
    (
        "ssjf-aging, all late",
        "ssjf-aging",
        {"jct_target_s": 1e-3, "token_time_s": 1e-6, "aging_rate": 1.0},
    ),
    (
        "ssjf-aging, wait bound",
        "ssjf-aging",
        {"max_wait_s": 1e9, "jct_target_s": 0.0, "aging_rate": 1.0},
    ),
    ("sjf-oracle", "sjf-oracle", {}),
    ("ssjf+preempt", "ssjf+preempt", {}),
    ("ssjf-risk", "ssjf-risk", {}),
    ("ssjf-gittins", "ssjf-gittins", {}),
    ("ssjf-risk+preempt", "ssjf-risk+preempt", {}),
    ("ssjf-gittins+preempt", "ssjf-gittins+preempt", {}),
)
# The same policies with 4 bands and 8 tenants, fair share on.
BANDED: tuple[tuple[str, str, Settings], ...] = (
    ("fcfs, bands + fair share", "fcfs", {}),
    ("ssjf, bands + fair share", "ssjf", {}),
    ("ssjf-aging, bands + fair share", "ssjf-aging", {"jct_target_s": 120.0, "aging_rate": 1.0}),
    ("ssjf+preempt, bands + fair share", "ssjf+preempt", {}),
    ("ssjf-gittins+preempt, bands + fair share", "ssjf-gittins+preempt", {}),
)
# Policies whose jobs carry a length distribution (its log-sigma: the held-out spread).
DISTRIBUTED = ("ssjf-risk", "ssjf-gittins")
SIGMA = 0.6
BANDS = BandSettings(max_wait_s=1e9, fair_share=True)
TENANTS = tuple(f"t{i}" for i in range(8))


def _stats(ns: list[int]) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "mean_us": float(a.mean()),
        "p50_us": float(np.median(a)),
        "p99_us": float(np.percentile(a, 99)),
    }


def bench_policy(
    label: str,
    spec: str,
    settings: Settings,
    queued: int,
    iterations: int,
    seed: int,
    banded: bool = False,
) -> dict[str, Any]:
    rng = random.Random(seed)
    clock = VirtualClock()
    core = SchedulerCore(
        make_policy(spec, allow_oracle=True, **settings),
        Batching(BatchingMode.NONE),
        clock,
        queue_limit=queued * 4,
        bands=BANDS if banded else None,
    )
    core.add_worker("w", 1)
    next_id = 0
    distributed = spec.startswith(DISTRIBUTED)

    def new_job() -> int:
        nonlocal next_id
        t = rng.lognormvariate(5.5, 0.7)
        job = Job(next_id, arrival=clock.now(), true_tokens=int(t) + 1)
        if banded:
            job.priority = rng.randrange(4)
            job.tenant = rng.choice(TENANTS)
        core.submit(job)
        p = t * rng.lognormvariate(0, 0.5)
        core.on_prediction(
            next_id, p, quantiles=lognormal_quantiles(p, SIGMA) if distributed else None
        )
        next_id += 1
        return next_id - 1

    for _ in range(queued + 1):
        new_job()
    (first,) = core.dispatch()
    running = first.job.id
    decision_ns: list[int] = []
    perf = time.perf_counter_ns
    for _ in range(iterations):
        clock.t += 0.001
        t0 = perf()
        new_job()
        core.on_finish(running, "stop")
        (d,) = core.dispatch()
        t1 = perf()
        running = d.job.id
        decision_ns.append(t1 - t0)
    cancel_ns: list[int] = []
    live = [j.id for j in core.queue]
    rng.shuffle(live)
    for job_id in live[: min(iterations, len(live))]:
        t0 = perf()
        core.on_cancel(job_id)
        cancel_ns.append(perf() - t0)
    return {
        "policy": label,
        "queued": queued,
        "decision": _stats(decision_ns),
        "cancel_queued": _stats(cancel_ns),
    }


def bench_queue(
    spec: str, settings: Settings, queued: int, iterations: int, seed: int, banded: bool = False
) -> dict[str, float]:
    rng = random.Random(seed)
    clock = VirtualClock()
    policy = make_policy(spec, allow_oracle=True, **settings)
    q = BandedQueue(policy, clock, BANDS) if banded else policy.make_queue(clock)
    jobs = []
    for i in range(queued + iterations):
        j = Job(i, arrival=0.0, true_tokens=rng.randint(1, 2000))
        if banded:
            j.priority = rng.randrange(4)
            j.tenant = rng.choice(TENANTS)
        j.seq = i
        j.predicted = float(rng.randint(1, 2000))
        if spec.startswith(DISTRIBUTED):
            j.length_dist = LengthDistribution.lognormal(j.predicted, SIGMA)
        jobs.append(j)
    for j in jobs[:queued]:
        q.push(j)
    perf = time.perf_counter_ns
    t0 = perf()
    for j in jobs[queued:]:
        q.push(j)
        q.pop()
    return {"push_pop_mean_us": (perf() - t0) / iterations / 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-us", type=float, default=50.0)
    args = parser.parse_args()
    rows = []
    variants = [(v, False) for v in VARIANTS] + [(v, True) for v in BANDED]
    for (label, spec, settings), banded in variants:
        row = bench_policy(label, spec, settings, args.queued, args.iterations, args.seed, banded)
        row["queue_only"] = bench_queue(
            spec, settings, args.queued, args.iterations, args.seed, banded
        )
        rows.append(row)
    print(f"one decision with {args.queued:,} jobs queued (target <= {args.target_us:.0f} us)\n")
    print("| policy | decision mean us | p50 us | p99 us | cancel queued us | queue push+pop us |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d = r["decision"]
        print(
            f"| {r['policy']} | {d['mean_us']:.1f} | {d['p50_us']:.1f} | {d['p99_us']:.1f} "
            f"| {r['cancel_queued']['mean_us']:.1f} | {r['queue_only']['push_pop_mean_us']:.1f} |"
        )
    worst = max(r["decision"]["mean_us"] for r in rows)
    verdict = "meets" if worst <= args.target_us else "MISSES"
    print(f"\nworst mean decision {worst:.1f} us: {verdict} the {args.target_us:.0f} us target")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "scheduler_core.json"
    out.write_text(
        json.dumps(
            {
                "queued": args.queued,
                "iterations": args.iterations,
                "machine": {"python": platform.python_version(), "cpu": platform.processor()},
                "rows": rows,
            },
            indent=2,
        )
    )
    png = RESULTS / "scheduler_core.png"
    _plot(rows, args.queued, args.target_us, png)
    print(f"wrote {out} and {png}")
    return 0 if worst <= args.target_us else 1


def _plot(rows: list[dict[str, Any]], queued: int, target_us: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(x - 0.2, [r["decision"]["mean_us"] for r in rows], 0.4, label="mean")
    ax.bar(x + 0.2, [r["decision"]["p99_us"] for r in rows], 0.4, label="p99")
    ax.axhline(target_us, color="red", linestyle="--", label=f"target {target_us:.0f} us")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("microseconds per decision")
    ax.set_title(f"One scheduling decision with {queued:,} jobs queued")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
