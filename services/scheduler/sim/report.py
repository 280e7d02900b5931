"""Summaries of simulation runs: the numbers and the table a person pastes into a note."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.scheduler.sim.engine import RunResult


def completion_stats(
    arrival: NDArray[np.float64],
    wait: NDArray[np.float64],
    first_token: NDArray[np.float64],
    finish: NDArray[np.float64],
    tokens: NDArray[np.integer],
) -> dict[str, Any]:
    """JCT, wait and TTFT summaries and throughput over the finished requests (NaN finish:
    not finished). The simulator's report and the live benchmark's both use it, so a
    simulated and a live cell are counted the same way."""
    done = ~np.isnan(finish)
    jct = (finish - arrival)[done]
    w = wait[done]
    ttft = (first_token - arrival)[done]
    span = float(np.max(finish[done]) - np.min(arrival)) if done.any() else float("nan")
    return {
        "requests": int(done.sum()),
        "mean_jct_s": float(jct.mean()),
        "p50_jct_s": float(np.percentile(jct, 50)),
        "p99_jct_s": float(np.percentile(jct, 99)),
        "mean_wait_s": float(w.mean()),
        "p99_wait_s": float(np.percentile(w, 99)),
        "mean_ttft_s": float(ttft.mean()),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "throughput_rps": float(done.sum()) / span,
        "throughput_tps": float(tokens[done].sum()) / span,
    }


def summarize(r: RunResult) -> dict[str, Any]:
    stats = completion_stats(
        r.arrival, r.first_dispatch - r.arrival, r.first_token, r.finish, r.tokens
    )
    return {
        "policy": r.policy,
        "batching": r.batching,
        **stats,
        "lost": len(r.finish) - stats["requests"],
        "preemptions": r.preemptions,
        "cache_hit_rate": r.cache_hits / r.cache_lookups if r.cache_lookups else 0.0,
        "sim_wall_s": r.wall_seconds,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's mean and p99 JCT as a ratio to fcfs in the same batching mode."""
    base = {row["batching"]: row for row in rows if row["policy"] == "fcfs"}
    for row in rows:
        ref = base.get(row["batching"])
        if ref is None:
            continue
        row["mean_jct_vs_fcfs"] = row["mean_jct_s"] / ref["mean_jct_s"]
        row["p99_jct_vs_fcfs"] = row["p99_jct_s"] / ref["p99_jct_s"]
        row["tps_vs_fcfs"] = row["throughput_tps"] / ref["throughput_tps"]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| batching | policy | mean JCT s | p50 JCT s | p99 JCT s | mean wait s | p99 wait s "
        "| mean TTFT s | req/s | tok/s | mean/fcfs | p99/fcfs | preempt | sim s |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['batching']} | {r['policy']} | {r['mean_jct_s']:.3f} | {r['p50_jct_s']:.3f} "
            f"| {r['p99_jct_s']:.3f} | {r['mean_wait_s']:.3f} | {r['p99_wait_s']:.3f} "
            f"| {r['mean_ttft_s']:.3f} | {r['throughput_rps']:.2f} | {r['throughput_tps']:.0f} "
            f"| {r.get('mean_jct_vs_fcfs', float('nan')):.3f} "
            f"| {r.get('p99_jct_vs_fcfs', float('nan')):.3f} | {r['preemptions']} "
            f"| {r['sim_wall_s']:.1f} |"
        )
    return "\n".join(lines)
