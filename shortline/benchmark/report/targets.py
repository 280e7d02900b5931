"""The issue-7 targets, judged on a run's rows (live cells and simulated settings).

The runner stores them in ``results.json``; the jittered replays (:mod:`shortline.benchmark.spread`)
judge them again on every replay.
"""

from __future__ import annotations

import math
from typing import Any

from shortline.benchmark.report.formatting import pct


def _cell(rows: list[dict[str, Any]], policy: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["policy"] == policy), None)


def targets(
    live_rows: list[dict[str, Any]], at_scale_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue-7 targets, checked on the live cells nearest rho 0.9 and on each simulated size."""
    groups: list[tuple[str, str, list[dict[str, Any]]]] = []
    if live_rows:
        rho = min({r["rho"] for r in live_rows}, key=lambda x: abs(x - 0.9))
        for mode in dict.fromkeys(r["batching"] for r in live_rows):
            rows = [r for r in live_rows if r["batching"] == mode and r["rho"] == rho]
            groups.append((f"live rho {rho:g}", mode, rows))

    def setting(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["workers"], r.get("arrivals", ""), r.get("lengths", ""), r.get("kendall_tau"))

    for key in dict.fromkeys(setting(r) for r in at_scale_rows):
        w, arr, lengths, tau = key
        where = f"sim {w} worker(s), {arr}, rho 0.9"
        if lengths:
            where += f", {lengths} lengths, noise at tau {tau:.2f}"
        for mode in dict.fromkeys(r["batching"] for r in at_scale_rows):
            rows = [r for r in at_scale_rows if setting(r) == key and r["batching"] == mode]
            if rows:
                groups.append((where, mode, rows))
    out: list[dict[str, Any]] = []

    def add(target: str, where: str, mode: str, value: float, met: bool, text: str) -> None:
        out.append(
            {
                "target": target,
                "where": where,
                "batching": mode,
                "value": value,
                "met": met,
                "shown": text,
            }
        )

    for where, mode, rows in groups:
        fcfs, ssjf = _cell(rows, "fcfs"), _cell(rows, "ssjf")
        if fcfs is None or ssjf is None:
            continue
        share = ssjf.get("oracle_share", math.nan)
        if not math.isnan(share):
            add(
                "ssjf captures >= 80% of the oracle's gain",
                where,
                mode,
                share,
                share >= 0.8,
                pct(share),
            )
        ratio = ssjf["mean_jct_s"] / fcfs["mean_jct_s"]
        if mode == "none":
            add(
                "no batching: ssjf mean JCT / fcfs <= 0.70",
                where,
                mode,
                ratio,
                ratio <= 0.70,
                f"{ratio:.3f}",
            )
        pre = _cell(rows, "ssjf+preempt")
        if mode == "continuous" and pre is not None:
            r = pre["mean_jct_s"] / ssjf["mean_jct_s"]
            add(
                "continuous: ssjf+preempt mean JCT < ssjf",
                where,
                mode,
                r,
                r < 1.0,
                f"{r:.3f} of ssjf",
            )
        aging = _cell(rows, "ssjf-aging")
        if aging is not None:
            p99 = aging["p99_jct_s"] / fcfs["p99_jct_s"]
            gain = fcfs["mean_jct_s"] - ssjf["mean_jct_s"]
            kept = (fcfs["mean_jct_s"] - aging["mean_jct_s"]) / gain if gain > 0 else math.nan
            ok = p99 <= 1.10 and kept >= 2 / 3
            add(
                "ssjf-aging p99 <= 1.10 x fcfs, keeping >= 2/3 of ssjf's mean gain",
                where,
                mode,
                p99,
                ok,
                f"p99 {p99:.2f} x fcfs, keeps {pct(kept)}",
            )
        worst = min(r["throughput_tps"] / fcfs["throughput_tps"] for r in rows)
        add(
            "tokens/s of every policy / fcfs >= 0.98",
            where,
            mode,
            worst,
            worst >= 0.98,
            f"min {worst:.3f}",
        )
    return out
