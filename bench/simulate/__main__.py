"""Three tables from the simulator, all with one worker model (step a + b*batch):

1. policies at rho 0.9 (fcfs, ssjf, ssjf-aging, ssjf+preempt, sjf-oracle), no
   batching and continuous batching with 8 slots, alpaca_eval Llama-3-8B
   lengths (held-out prompts), real predictor head;
2. the limits of issue 7: oracle SJF and a preemptive oracle (SRPT-like) as a
   ratio to fcfs, Poisson arrivals, decode only;
3. simulator speed: 1M requests over 256 workers.

    .venv/bin/python -m bench.simulate [--quick] [--predictor real|noisy:0.8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.policies import PreemptionRule, make_policy
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.report import summarize, table
from services.scheduler.sim.runner import SimulateConfig, run
from services.scheduler.sim.service_model import ServiceModel, capacity
from services.scheduler.sim.workload import (
    LengthSet,
    Workload,
    alpaca_lengths,
    arrival_times,
    trace_lengths,
)
from shortline.simulation import real_predictor

RESULTS = Path(__file__).resolve().parent.parent / "results"
MODEL = ServiceModel(step_a_s=0.020, step_b_s=0.002)
SRPT = PreemptionRule(factor=1.0, max_fraction=1.0, max_per_job=1_000_000)


def limits(lengths: LengthSet, n: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for mode, slots in ((BatchingMode.NONE, 1), (BatchingMode.CONTINUOUS, 8)):
        batching = Batching(mode, max_batch=slots)
        cap = capacity(MODEL, batching, 1, slots, lengths.true_tokens, lengths.prompt_tokens)
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, lengths.true_tokens.shape[0], size=n)
        work = Workload(
            arrivals=arrival_times("poisson", n, 0.9 * cap, rng),
            prompt_tokens=np.zeros(n, dtype=np.int64),  # decode only
            true_tokens=lengths.true_tokens[pick],
            predicted=lengths.true_tokens[pick].astype(np.float64),
            prediction_source="oracle",
        )
        res = {}
        for name in ("fcfs", "sjf-oracle", "sjf-oracle+preempt"):
            policy = make_policy(name, allow_oracle=True, preemption=SRPT)
            res[name] = summarize(
                simulate(work, policy, batching, workers=1, slots=slots, model=MODEL)
            )
        f = res["fcfs"]
        lengths_cv = float(np.std(lengths.true_tokens) / np.mean(lengths.true_tokens))
        rows.append(
            {
                "lengths": lengths.name,
                "cv": lengths_cv,
                "batching": f"{mode.value}" + (f", {slots} slots" if slots > 1 else ""),
                "oracle_vs_fcfs_mean": res["sjf-oracle"]["mean_jct_s"] / f["mean_jct_s"],
                "srpt_vs_fcfs_mean": res["sjf-oracle+preempt"]["mean_jct_s"] / f["mean_jct_s"],
                "oracle_vs_fcfs_p99": res["sjf-oracle"]["p99_jct_s"] / f["p99_jct_s"],
                "requests": n,
            }
        )
    return rows


def speed(n: int, workers: int) -> list[dict[str, Any]]:
    cfg = SimulateConfig(
        requests=n,
        workers=workers,
        slots=8,
        batching="continuous",
        policies="fcfs,ssjf",
        predictor="noisy:0.8",
        rho=0.9,
    )
    t0 = time.perf_counter()
    report = run(cfg)
    total = time.perf_counter() - t0
    return [
        {
            "requests": n,
            "workers": workers,
            "policy": r["policy"],
            "sim_wall_s": r["sim_wall_s"],
            "requests_per_wall_s": n / r["sim_wall_s"],
            "run_total_s": total,
        }
        for r in report["rows"]
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description="simulated scheduling benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer requests (CI)")
    parser.add_argument("--predictor", default="real")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    n_cmp = 10_000 if args.quick else 50_000
    n_lim = 20_000 if args.quick else 100_000
    n_speed = 100_000 if args.quick else 1_000_000
    out: dict[str, Any] = {"model": MODEL.__dict__}

    cfg = SimulateConfig(
        requests=n_cmp,
        policies="fcfs,ssjf,ssjf-aging,ssjf+preempt,sjf-oracle",
        batching="none,continuous",
        predictor=args.predictor,
        seed=args.seed,
    )
    report = run(cfg, real_predictor())
    out["policies"] = report
    print(f"## Policies at rho 0.9 ({n_cmp:,} requests, predictor {args.predictor})\n")
    print(table(report["rows"]))
    for mode in ("none", "continuous"):
        rows = {r["policy"]: r for r in report["rows"] if r["batching"] == mode}
        f, s, o = rows["fcfs"], rows["ssjf"], rows["sjf-oracle"]
        share = (f["mean_jct_s"] - s["mean_jct_s"]) / (f["mean_jct_s"] - o["mean_jct_s"])
        print(f"{mode}: ssjf captures {share:.0%} of the oracle's mean-JCT gain")

    lim = limits(alpaca_lengths("Meta-Llama-3-8B-Instruct", "all"), n_lim, args.seed)
    lim += limits(trace_lengths("conv"), n_lim, args.seed)
    out["limits"] = lim
    print(f"\n## Limits at rho 0.9, Poisson, decode only ({n_lim:,} requests)\n")
    print(
        "| lengths | CV | batching | oracle SJF / fcfs mean | SRPT / fcfs mean "
        "| oracle p99 / fcfs p99 |"
    )
    print("|---|---|---|---|---|---|")
    for r in lim:
        print(
            f"| {r['lengths']} | {r['cv']:.2f} | {r['batching']} | {r['oracle_vs_fcfs_mean']:.2f} "
            f"| {r['srpt_vs_fcfs_mean']:.2f} | {r['oracle_vs_fcfs_p99']:.2f} |"
        )

    sp = speed(n_speed, 256)
    out["speed"] = sp
    print(f"\n## Simulator speed: {n_speed:,} requests, 256 workers x 8 slots, rho 0.9\n")
    print("| policy | sim wall s | requests / wall s |")
    print("|---|---|---|")
    for r in sp:
        print(f"| {r['policy']} | {r['sim_wall_s']:.1f} | {r['requests_per_wall_s']:,.0f} |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "simulate.json"
    path.write_text(json.dumps(out, indent=2, default=float))
    png = RESULTS / "simulate.png"
    _plot(report["rows"], png)
    print(f"\nwrote {path} and {png}")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["batching"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        cell = [r for r in rows if r["batching"] == mode]
        x = np.arange(len(cell))
        ax.bar(x - 0.2, [r["mean_jct_vs_fcfs"] for r in cell], 0.4, label="mean JCT")
        ax.bar(x + 0.2, [r["p99_jct_vs_fcfs"] for r in cell], 0.4, label="p99 JCT")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [r["policy"] for r in cell], rotation=20)
        ax.set_title(f"{mode}: ratio to fcfs at rho 0.9")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
