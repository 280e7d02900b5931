"""Summaries of simulation runs: the numbers and the table a person pastes into a note.

The statistics themselves (completion summaries, ratios to fcfs) live in
:mod:`shortline.common.stats`, shared with the live benchmark; this module
names a simulated run's row and prints the table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.scheduler.sim.engine import RunResult
from shortline.common import stats
from shortline.common.stats import completion_stats

__all__ = [
    "ORACLE",
    "SIM_RATIOS",
    "add_ratios",
    "completion_stats",
    "group_table",
    "groups",
    "summarize",
    "table",
]

# The ratios ``shortline simulate`` reports, under the names its JSON has always had.
SIM_RATIOS = {
    "mean_jct_s": "mean_jct_vs_fcfs",
    "p99_jct_s": "p99_jct_vs_fcfs",
    "throughput_tps": "tps_vs_fcfs",
}


def summarize(r: RunResult) -> dict[str, Any]:
    summary = completion_stats(
        r.arrival, r.first_dispatch - r.arrival, r.first_token, r.finish, r.tokens
    )
    return {
        "policy": r.policy,
        "batching": r.batching,
        **summary,
        "lost": len(r.finish) - summary["requests"],
        "preemptions": r.preemptions,
        "cache_hit_rate": r.cache_hits / r.cache_lookups if r.cache_lookups else 0.0,
        "sim_wall_s": r.wall_seconds,
    }


ORACLE = "sjf-oracle"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's mean and p99 JCT and tokens/s as a ratio to fcfs in the same batching
    mode, and its share of the oracle's mean-JCT gain over fcfs (``oracle_share``)."""
    stats.add_ratios(rows, ("batching",), SIM_RATIOS, oracle=ORACLE)


def _share(row: dict[str, Any]) -> str:
    if row["policy"] in ("fcfs", ORACLE):
        return ""
    share = row.get("oracle_share", float("nan"))
    return "-" if share != share else f"{share:.0%}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| batching | policy | mean JCT s | p50 JCT s | p99 JCT s | mean wait s | p99 wait s "
        "| mean TTFT s | req/s | tok/s | mean/fcfs | p99/fcfs | oracle share | preempt | sim s |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['batching']} | {r['policy']} | {r['mean_jct_s']:.3f} | {r['p50_jct_s']:.3f} "
            f"| {r['p99_jct_s']:.3f} | {r['mean_wait_s']:.3f} | {r['p99_wait_s']:.3f} "
            f"| {r['mean_ttft_s']:.3f} | {r['throughput_rps']:.2f} | {r['throughput_tps']:.0f} "
            f"| {r.get('mean_jct_vs_fcfs', float('nan')):.3f} "
            f"| {r.get('p99_jct_vs_fcfs', float('nan')):.3f} | {_share(r)} | {r['preemptions']} "
            f"| {r['sim_wall_s']:.1f} |"
        )
    return "\n".join(lines)


def groups(r: RunResult) -> list[dict[str, Any]]:
    """Mean and p99 JCT per priority band and per tenant, when the workload has them
    (what an operator asks of bands and fair share: who paid for whom)."""
    jct = r.finish - r.arrival
    out: list[dict[str, Any]] = []
    labelled: list[tuple[str, list[Any]]] = []
    if r.priority is not None:
        labelled.append(("band", r.priority.tolist()))
    if r.tenant is not None:
        labelled.append(("tenant", list(r.tenant)))
    for by, labels in labelled:
        keys = np.asarray(labels, dtype=object)
        for value in sorted(set(labels), key=lambda v: (str(type(v)), v)):
            mine = jct[(keys == value) & np.isfinite(jct)]
            if not mine.size:
                continue
            out.append(
                {
                    "policy": r.policy,
                    "batching": r.batching,
                    "by": by,
                    "group": value,
                    "requests": int(mine.size),
                    "mean_jct_s": float(mine.mean()),
                    "p99_jct_s": stats.percentile(mine, 99),
                }
            )
    return out


def group_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batching | policy | by | group | requests | mean JCT s | p99 JCT s |"]
    lines.append("|" + "---|" * 7)
    for g in rows:
        lines.append(
            f"| {g['batching']} | {g['policy']} | {g['by']} | {g['group']} | {g['requests']} "
            f"| {g['mean_jct_s']:.3f} | {g['p99_jct_s']:.3f} |"
        )
    return "\n".join(lines)
