"""The Markdown tables of a benchmark run, one function per table, each over result rows."""

from __future__ import annotations

import math
from typing import Any

from shortline.benchmark.report.formatting import fmt, md_table, pct, value_range
from shortline.benchmark.report.targets import targets


def latency_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "batching",
        "rho",
        "policy",
        "mean JCT s",
        "p50 JCT s",
        "p99 JCT s",
        "mean TTFT s",
        "p99 TTFT s",
        "mean wait s",
        "p99 wait s",
        "mean/fcfs",
        "p50/fcfs",
        "p99/fcfs",
        "TTFT/fcfs",
        "wait/fcfs",
        "oracle share",
    ]
    body = [
        [
            r["batching"],
            fmt(r.get("rho")),
            r["policy"],
            fmt(r["mean_jct_s"]),
            fmt(r["p50_jct_s"]),
            fmt(r["p99_jct_s"]),
            fmt(r["mean_ttft_s"]),
            fmt(r["p99_ttft_s"]),
            fmt(r["mean_wait_s"]),
            fmt(r["p99_wait_s"]),
            fmt(r.get("mean_jct_vs_fcfs")),
            fmt(r.get("p50_jct_vs_fcfs")),
            fmt(r.get("p99_jct_vs_fcfs")),
            fmt(r.get("mean_ttft_vs_fcfs")),
            fmt(r.get("mean_wait_vs_fcfs")),
            pct(r.get("oracle_share")) if r["policy"] not in ("fcfs", "sjf-oracle") else "",
        ]
        for r in rows
    ]
    return md_table(head, body)


def _exact(r: dict[str, Any]) -> str:
    if "exact_length" not in r:
        return "-"
    return f"{r['exact_length']}/{r['requests'] + r['unfinished']}"


def throughput_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "batching",
        "rho",
        "policy",
        "req/s",
        "tok/s",
        "tok/s / fcfs",
        "goodput req/s",
        "SLO met",
        "goodput/fcfs",
        "preemptions",
        "exact lengths",
        "paper metric req/s (25% done)",
        "paper metric / fcfs",
    ]
    body = [
        [
            r["batching"],
            fmt(r.get("rho")),
            r["policy"],
            fmt(r["throughput_rps"]),
            fmt(r["throughput_tps"], 0),
            fmt(r.get("throughput_tps_vs_fcfs"), 3),
            fmt(r.get("goodput_rps")),
            pct(r.get("slo_met")),
            fmt(r.get("goodput_rps_vs_fcfs")),
            fmt(r.get("preemptions")),
            _exact(r),
            fmt(r.get("paper_throughput_rps")),
            fmt(r.get("paper_throughput_rps_vs_fcfs")),
        ]
        for r in rows
    ]
    return md_table(head, body)


def at_scale_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "workers",
        "batching",
        "rho",
        "policy",
        "mean JCT s",
        "p99 JCT s",
        "mean TTFT s",
        "mean/fcfs",
        "p99/fcfs",
        "tok/s / fcfs",
        "oracle share",
        "preemptions",
    ]
    body = [
        [
            str(r["workers"]),
            r["batching"],
            fmt(r["rho"]),
            r["policy"],
            fmt(r["mean_jct_s"]),
            fmt(r["p99_jct_s"]),
            fmt(r["mean_ttft_s"]),
            fmt(r.get("mean_jct_vs_fcfs"), 3),
            fmt(r.get("p99_jct_vs_fcfs"), 3),
            fmt(r.get("throughput_tps_vs_fcfs"), 3),
            pct(r.get("oracle_share")) if r["policy"] not in ("fcfs", "sjf-oracle") else "",
            str(r.get("preemptions", "-")),
        ]
        for r in rows
    ]
    return md_table(head, body)


def _guard(r: dict[str, Any], name: str, scale: float, digits: int) -> str:
    if not r["policy"].startswith("ssjf-aging"):
        return "-"
    live, sim = r.get(f"live_{name}"), r.get(f"sim_{name}")
    if live is None or sim is None:
        return "-"
    return f"{fmt(scale * live, digits)} / {fmt(scale * sim, digits)}"


def live_vs_sim_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "batching",
        "rho",
        "policy",
        "live mean JCT s",
        "sim mean JCT s",
        "sim/live",
        "sim with probe a, b, s",
        "run overhead ms",
        "join delay ms",
        "live mean/fcfs",
        "sim mean/fcfs",
        "ssjf-aging late jobs live / sim",
        "token time ms live / sim",
    ]
    body = [
        [
            r["batching"],
            fmt(r["rho"]),
            r["policy"],
            fmt(r["live_mean_jct_s"]),
            fmt(r["sim_mean_jct_s"]),
            fmt(r["sim_over_live"], 3),
            fmt(r.get("sim_probe_mean_jct_s")),
            fmt(1e3 * r.get("run_overhead_s", 0.0), 1),
            fmt(1e3 * r.get("join_delay_s", 0.0), 1),
            fmt(r["live_mean_jct_vs_fcfs"], 3),
            fmt(r["sim_mean_jct_vs_fcfs"], 3),
            _guard(r, "late_jobs", 1.0, 0),
            _guard(r, "token_time_s", 1e3, 3),
        ]
        for r in rows
    ]
    return md_table(head, body)


def spread_tables(spread: dict[str, Any], live_rows: list[dict[str, Any]]) -> str:
    """Live ratios beside the range of the jittered replays, and targets met per replay."""
    live = {(r["batching"], r["rho"], r["policy"]): r for r in live_rows}

    def _live(c: dict[str, Any]) -> dict[str, Any]:
        return live.get((c["batching"], c["rho"], c["policy"]), {})

    n = spread["replays"]
    cells = md_table(
        [
            "batching",
            "rho",
            "policy",
            "live mean/fcfs",
            f"replays mean/fcfs ({n})",
            "live p99/fcfs",
            f"replays p99/fcfs ({n})",
        ],
        [
            [
                c["batching"],
                fmt(c["rho"]),
                c["policy"],
                fmt(_live(c).get("mean_jct_vs_fcfs"), 3),
                value_range(c["mean_jct_vs_fcfs"], 3),
                fmt(_live(c).get("p99_jct_vs_fcfs")),
                value_range(c["p99_jct_vs_fcfs"], 2),
            ]
            for c in spread["cells"]
            if c["policy"] != "fcfs"
        ],
    )
    live_targets = {(t["target"], t["batching"]): t for t in targets(live_rows, [])}
    goals = md_table(
        ["target", "batching", "live run", "met live", f"met in replays (of {n})", "replays"],
        [
            [
                t["target"],
                t["batching"],
                live_targets.get((t["target"], t["batching"]), {}).get("shown", "-"),
                "yes"
                if live_targets.get((t["target"], t["batching"]), {}).get("met")
                else "**no**",
                str(t["met"]),
                value_range(t["values"], 3),
            ]
            for t in spread["targets"]
        ],
    )
    return cells + "\n\n" + goals


def aging_table(rows: list[dict[str, Any]]) -> str:
    return md_table(
        [
            "batching",
            "rate (key tokens per job time)",
            "JCT target D (job times)",
            "D / fcfs p99",
            "mean/fcfs",
            "p99/fcfs",
            "kept of ssjf's gain",
            "target met",
        ],
        [
            [
                r["batching"],
                fmt(r["rate_per_job_time"], 0),
                fmt(r["bound_job_times"], 0),
                fmt(r.get("jct_target_vs_fcfs_p99", math.nan), 2),
                fmt(r["mean_jct_vs_fcfs"], 3),
                fmt(r["p99_jct_vs_fcfs"], 2),
                pct(r["kept_of_ssjf_gain"]),
                "yes" if r["meets_target"] else "no",
            ]
            for r in rows
        ],
    )


def targets_table(rows: list[dict[str, Any]]) -> str:
    return md_table(
        ["target", "where", "batching", "measured", "met"],
        [
            [r["target"], r["where"], r["batching"], r["shown"], "yes" if r["met"] else "**no**"]
            for r in rows
        ],
    )


def sensitivity_tables(result: dict[str, Any]) -> str:
    noise = result.get("sensitivity_noise", [])
    cache = result.get("sensitivity_cache", [])
    a = md_table(
        [
            "predictor",
            "Kendall tau",
            "batching",
            "ssjf mean/fcfs",
            "oracle mean/fcfs",
            "oracle share",
        ],
        [
            [
                r["predictor"],
                fmt(r["kendall_tau"], 3),
                r["batching"],
                fmt(r["mean_jct_vs_fcfs"], 3),
                fmt(r["oracle_mean_jct_vs_fcfs"], 3),
                pct(r["oracle_share"]),
            ]
            for r in noise
        ],
    )
    b = md_table(
        ["repeat share", "batching", "cache hit rate", "ssjf mean/fcfs", "oracle share"],
        [
            [
                fmt(r["repeat_share"]),
                r["batching"],
                pct(r["cache_hit_rate"]),
                fmt(r["mean_jct_vs_fcfs"], 3),
                pct(r["oracle_share"]),
            ]
            for r in cache
        ],
    )
    return a + "\n\n" + b
