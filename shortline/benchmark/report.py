"""JSON, Markdown tables and PNG plots of a benchmark run, and the issue-7 targets check."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

POLICY_ORDER = ["fcfs", "ssjf", "ssjf-aging", "ssjf+preempt", "sjf-oracle"]


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.0f}%"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


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
            _f(r.get("rho")),
            r["policy"],
            _f(r["mean_jct_s"]),
            _f(r["p50_jct_s"]),
            _f(r["p99_jct_s"]),
            _f(r["mean_ttft_s"]),
            _f(r["p99_ttft_s"]),
            _f(r["mean_wait_s"]),
            _f(r["p99_wait_s"]),
            _f(r.get("mean_jct_vs_fcfs")),
            _f(r.get("p50_jct_vs_fcfs")),
            _f(r.get("p99_jct_vs_fcfs")),
            _f(r.get("mean_ttft_vs_fcfs")),
            _f(r.get("mean_wait_vs_fcfs")),
            _pct(r.get("oracle_share")) if r["policy"] not in ("fcfs", "sjf-oracle") else "",
        ]
        for r in rows
    ]
    return _table(head, body)


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
            _f(r.get("rho")),
            r["policy"],
            _f(r["throughput_rps"]),
            _f(r["throughput_tps"], 0),
            _f(r.get("throughput_tps_vs_fcfs"), 3),
            _f(r.get("goodput_rps")),
            _pct(r.get("slo_met")),
            _f(r.get("goodput_rps_vs_fcfs")),
            _f(r.get("preemptions")),
            _exact(r),
            _f(r.get("paper_throughput_rps")),
            _f(r.get("paper_throughput_rps_vs_fcfs")),
        ]
        for r in rows
    ]
    return _table(head, body)


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
            _f(r["rho"]),
            r["policy"],
            _f(r["mean_jct_s"]),
            _f(r["p99_jct_s"]),
            _f(r["mean_ttft_s"]),
            _f(r.get("mean_jct_vs_fcfs"), 3),
            _f(r.get("p99_jct_vs_fcfs"), 3),
            _f(r.get("throughput_tps_vs_fcfs"), 3),
            _pct(r.get("oracle_share")) if r["policy"] not in ("fcfs", "sjf-oracle") else "",
            str(r.get("preemptions", "-")),
        ]
        for r in rows
    ]
    return _table(head, body)


def _guard(r: dict[str, Any], name: str, scale: float, digits: int) -> str:
    if not r["policy"].startswith("ssjf-aging"):
        return "-"
    live, sim = r.get(f"live_{name}"), r.get(f"sim_{name}")
    if live is None or sim is None:
        return "-"
    return f"{_f(scale * live, digits)} / {_f(scale * sim, digits)}"


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
            _f(r["rho"]),
            r["policy"],
            _f(r["live_mean_jct_s"]),
            _f(r["sim_mean_jct_s"]),
            _f(r["sim_over_live"], 3),
            _f(r.get("sim_probe_mean_jct_s")),
            _f(1e3 * r.get("run_overhead_s", 0.0), 1),
            _f(1e3 * r.get("join_delay_s", 0.0), 1),
            _f(r["live_mean_jct_vs_fcfs"], 3),
            _f(r["sim_mean_jct_vs_fcfs"], 3),
            _guard(r, "late_jobs", 1.0, 0),
            _guard(r, "token_time_s", 1e3, 3),
        ]
        for r in rows
    ]
    return _table(head, body)


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
                _pct(share),
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
                f"p99 {p99:.2f} x fcfs, keeps {_pct(kept)}",
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


def _range(xs: list[float], digits: int) -> str:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    return f"{_f(min(v), digits)}-{_f(max(v), digits)} (median {_f(statistics.median(v), digits)})"


def spread_tables(spread: dict[str, Any], live_rows: list[dict[str, Any]]) -> str:
    """Live ratios beside the range of the jittered replays, and targets met per replay."""
    live = {(r["batching"], r["rho"], r["policy"]): r for r in live_rows}
    n = spread["replays"]
    cells = _table(
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
                _f(c["rho"]),
                c["policy"],
                _f(live.get((c["batching"], c["rho"], c["policy"]), {}).get("mean_jct_vs_fcfs"), 3),
                _range(c["mean_jct_vs_fcfs"], 3),
                _f(live.get((c["batching"], c["rho"], c["policy"]), {}).get("p99_jct_vs_fcfs")),
                _range(c["p99_jct_vs_fcfs"], 2),
            ]
            for c in spread["cells"]
            if c["policy"] != "fcfs"
        ],
    )
    live_targets = {(t["target"], t["batching"]): t for t in targets(live_rows, [])}
    goals = _table(
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
                _range(t["values"], 3),
            ]
            for t in spread["targets"]
        ],
    )
    return cells + "\n\n" + goals


def _spread_section(
    title: str, note: str, sp: dict[str, Any], live: list[dict[str, Any]]
) -> list[str]:
    return [
        f"## {title}",
        "",
        f"{sp['replays']} replays at the probe step; each shifts every arrival by "
        f"0-{sp['jitter_s'] * 1e3:g} ms (uniform) and scales the step by N(1, "
        f"{sp['step_sd']:g}), the same for every policy of the replay. {note}",
        "",
        spread_tables(sp, live),
        "",
    ]


def aging_table(rows: list[dict[str, Any]]) -> str:
    return _table(
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
                _f(r["rate_per_job_time"], 0),
                _f(r["bound_job_times"], 0),
                _f(r.get("jct_target_vs_fcfs_p99", math.nan), 2),
                _f(r["mean_jct_vs_fcfs"], 3),
                _f(r["p99_jct_vs_fcfs"], 2),
                _pct(r["kept_of_ssjf_gain"]),
                "yes" if r["meets_target"] else "no",
            ]
            for r in rows
        ],
    )


def targets_table(rows: list[dict[str, Any]]) -> str:
    return _table(
        ["target", "where", "batching", "measured", "met"],
        [
            [r["target"], r["where"], r["batching"], r["shown"], "yes" if r["met"] else "**no**"]
            for r in rows
        ],
    )


def sensitivity_tables(result: dict[str, Any]) -> str:
    noise = result.get("sensitivity_noise", [])
    cache = result.get("sensitivity_cache", [])
    a = _table(
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
                _f(r["kendall_tau"], 3),
                r["batching"],
                _f(r["mean_jct_vs_fcfs"], 3),
                _f(r["oracle_mean_jct_vs_fcfs"], 3),
                _pct(r["oracle_share"]),
            ]
            for r in noise
        ],
    )
    b = _table(
        ["repeat share", "batching", "cache hit rate", "ssjf mean/fcfs", "oracle share"],
        [
            [
                _f(r["repeat_share"]),
                r["batching"],
                _pct(r["cache_hit_rate"]),
                _f(r["mean_jct_vs_fcfs"], 3),
                _pct(r["oracle_share"]),
            ]
            for r in cache
        ],
    )
    return a + "\n\n" + b


def _by_tau(rows: list[dict[str, Any]]) -> list[tuple[float, list[dict[str, Any]]]]:
    taus = dict.fromkeys(r["kendall_tau"] for r in rows)
    return [(t, [r for r in rows if r["kendall_tau"] == t]) for t in taus]


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    m = result["machine"]
    parts = [
        f"# shortline bench, {result['started_utc']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_avg_1m_at_start']:.2f} "
        f"at start; Python {m['python']}. Wall time {result.get('wall_s', 0):.0f} s.",
        "",
        f"Requests: {result['lengths']['set']} ({result['lengths']['unique_prompts']} held-out "
        f"prompts, true mean {result['lengths']['true_mean_tokens']:.0f} tokens); live lengths "
        f"divided by {cfg['length_scale']:g} (mean {result['lengths']['live_mean_tokens']:.1f}, "
        f"CV {result['lengths']['live_cv']:.2f}); arrivals azure2023/{cfg['trace']}; "
        f"{cfg['workers']} live worker(s), {cfg['slots']} slots, dynamic wait "
        f"{cfg['batch_wait_ms']:g} ms; {cfg['requests']} requests per live cell; goodput SLO: "
        f"JCT <= {cfg['slo_factor']:g} x tokens x (a + b).",
        "",
    ]
    cal = result.get("calibration")
    if cal:
        parts += [
            f"Replay step measured on the live stack: a = {cal['a_s'] * 1e3:.2f} ms, "
            f"b = {cal['b_s'] * 1e3:.3f} ms (alone {cal['one_s'] * 1e3:.2f} ms/token, "
            f"{cal['batch']} at once {cal['full_s'] * 1e3:.2f} ms/step; configured "
            f"{cfg['step_a_ms']:g} + {cfg['step_b_ms']:g} x batch). Fitted on the live cells "
            f"themselves (per request: mean step vs mean requests running beside it): "
            f"a = {1e3 * cal.get('fit_a_s', math.nan):.2f} ms, "
            f"b = {1e3 * cal.get('fit_b_s', math.nan):.3f} ms; the simulator of the live cells "
            "uses the fitted step, plus the measured run set-up time without batching and "
            "the measured delay before a dispatched run joins a batch, and charges a dynamic "
            "batch only for its running jobs, as the replay engine does (the at-scale runs "
            f"charge it {result.get('step_model', {}).get('dynamic_charge', 'padded')}).",
            "",
            _table(
                [
                    "batching",
                    "capacity req/s",
                    "capacity tok/s",
                    "aging rate key/s",
                    "ssjf-aging JCT target s (per load)",
                ],
                [
                    [
                        c["batching"],
                        _f(c["capacity_rps"]),
                        _f(c["capacity_tps"], 0),
                        _f(c["aging_rate"], 1),
                        ", ".join(f"rho {k}: {v:.1f}" for k, v in c.get("jct_target_s", {}).items())
                        or "-",
                    ]
                    for c in result["capacity"]
                ],
            ),
            "",
        ]
    if result["live"]:
        parts += [
            "## Live: latency",
            "",
            latency_table(result["live"]),
            "",
            "## Live: throughput and goodput",
            "",
            throughput_table(result["live"]),
            "",
            "## Live vs simulated (same requests, measured step)",
            "",
            live_vs_sim_table(result["live_vs_sim"]),
            "",
        ]
        if result.get("replay_spread"):
            parts += _spread_section(
                "How far one run can move (the live cells replayed in the simulator, jittered)",
                "The aging target's value column is its p99 / fcfs.",
                result["replay_spread"],
                result["live"],
            )
        if result.get("replay_spread_true"):
            parts += _spread_section(
                "The same replays with a perfect predictor",
                "Every prediction is the true replayed length (ssjf then orders as the oracle "
                "does; the aging guard knows every service). The live columns are the run as it "
                "ran, with the head: what the replays still miss is the policy's, on these "
                "arrivals, not the predictor's.",
                result["replay_spread_true"],
                result["live"],
            )
    parts += [
        "## Simulated, issue-7 reference setting (1 worker, Poisson, production lengths, rho 0.9)",
        "",
        at_scale_table(result.get("sim_reference", [])),
        "",
        "## Simulated with the Azure trace's lengths (1 worker, Poisson, rho 0.9)",
        "",
        "The trace has lengths but no prompts: predictions are the true length times "
        "log-normal noise calibrated to each Kendall's tau (the head's own on alpaca, and "
        "0.60), not a predictor's output.",
        "",
        *[
            f"Noise at tau {tau:.2f} (sigma {rows[0]['noise_sigma']:.2f}):\n\n"
            + at_scale_table(rows)
            + "\n"
            for tau, rows in _by_tau(result.get("sim_azure_lengths", []))
        ],
        "## Simulated at scale (production lengths, Azure arrivals, rho 0.9)",
        "",
        at_scale_table(result["sim_at_scale"]),
        "",
        "## Simulated mean JCT vs load",
        "",
        at_scale_table(result["sim_load"]),
        "",
        "## Sensitivity (simulated: 1 worker, Poisson, production lengths, rho 0.9)",
        "",
        sensitivity_tables(result),
        "",
        "## ssjf-aging settings (simulated reference: 1 worker, Poisson, rho 0.9)",
        "",
        aging_table(result.get("aging_sweep", [])),
        "",
        "## Issue-7 targets",
        "",
        targets_table(result["targets"]),
        "",
    ]
    return "\n".join(parts)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _order(policies: Any) -> list[str]:
    ps = list(dict.fromkeys(policies))
    return sorted(ps, key=lambda p: POLICY_ORDER.index(p) if p in POLICY_ORDER else 99)


def plot_cdf(result: dict[str, Any], cdfs: dict[str, dict[str, list[float]]], path: Path) -> bool:
    live = result["live"]
    if not live:
        return False
    plt = _plt()
    rho = min({r["rho"] for r in live}, key=lambda x: abs(x - 0.9))
    modes = list(dict.fromkeys(r["batching"] for r in live))
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for p in _order(r["policy"] for r in live if r["batching"] == mode):
            jct = cdfs.get(f"{mode}-{rho:g}-{p}", {}).get("jct", [])
            jct = [x for x in jct if not math.isnan(x)]
            if jct:
                ax.plot(jct, [(i + 1) / len(jct) for i in range(len(jct))], label=p, lw=1.2)
        ax.set_xscale("log")
        ax.set_title(f"live, {mode}, rho {rho:g}", fontsize=9)
        ax.set_xlabel("job completion time (s)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of jobs", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_load(result: dict[str, Any], path: Path) -> bool:
    """Top: simulated mean JCT vs load. Bottom: the same as a ratio to fcfs, with the live
    cells (scaled lengths, so only the ratio compares) as crosses. A run without the
    at-scale simulation (``--sim-workers ""``) but with live cells at two loads or more
    plots the live cells as the lines instead."""
    rows = result["sim_load"]
    simulated = bool(rows)
    if not simulated:
        rows = result["live"]
        if len({r["rho"] for r in rows}) < 2:
            return False
    plt = _plt()
    modes = list(dict.fromkeys(r["batching"] for r in rows))
    fig, axes = plt.subplots(2, len(modes), figsize=(4 * len(modes), 5), squeeze=False)
    w = rows[0]["workers"] if simulated else result["config"]["workers"]
    for col, mode in enumerate(modes):
        top, bottom = axes[0][col], axes[1][col]
        for p in _order(r["policy"] for r in rows):
            mine = [r for r in rows if r["batching"] == mode and r["policy"] == p]
            pts = sorted(
                (r["rho"], r["mean_jct_s"], r.get("mean_jct_vs_fcfs", math.nan)) for r in mine
            )
            if not pts:
                continue
            line = top.plot(
                [x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", ms=3, label=p
            )
            color = line[0].get_color()
            bottom.plot(
                [x for x, _, _ in pts], [z for _, _, z in pts], marker="o", ms=3, color=color
            )
            lv = sorted(
                (r["rho"], r.get("mean_jct_vs_fcfs", math.nan))
                for r in result["live"]
                if r["batching"] == mode and r["policy"] == p
            )
            if lv and simulated:
                bottom.plot(
                    [x for x, _ in lv], [y for _, y in lv], ls="none", marker="x", ms=7, color=color
                )
        top.set_yscale("log")
        top.set_title(f"{mode}: {'simulated' if simulated else 'live'}, {w} workers", fontsize=9)
        bottom.set_xlabel("load rho", fontsize=8)
        bottom.set_title(
            "ratio to fcfs; x = live (1 worker)"
            if simulated and result["live"]
            else "ratio to fcfs",
            fontsize=8,
        )
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean JCT (s)", fontsize=8)
    axes[1][0].set_ylabel("mean JCT / fcfs", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_noise(result: dict[str, Any], path: Path) -> bool:
    rows = result.get("sensitivity_noise", [])
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for mode in dict.fromkeys(r["batching"] for r in rows):
        pts = sorted(
            (r["kendall_tau"], r["mean_jct_vs_fcfs"])
            for r in rows
            if r["batching"] == mode and r["predictor"] != "real"
        )
        line = ax.plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            marker="o",
            ms=3,
            label=f"{mode}: true x lognormal noise",
        )
        for r in rows:
            if r["batching"] == mode and r["predictor"] == "real":
                ax.plot(
                    [r["kendall_tau"]],
                    [r["mean_jct_vs_fcfs"]],
                    marker="*",
                    ms=11,
                    color=line[0].get_color(),
                    ls="none",
                    label=f"{mode}: real head",
                )
    _save_ssjf_ratio(
        fig,
        ax,
        path,
        xlabel="Kendall's tau of predicted vs true length",
        title="gain vs predictor quality (sim, 1 worker, Poisson, rho 0.9)",
    )
    return True


def plot_cache(result: dict[str, Any], path: Path) -> bool:
    rows = result.get("sensitivity_cache", [])
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for mode in dict.fromkeys(r["batching"] for r in rows):
        pts = sorted(
            (r["cache_hit_rate"], r["mean_jct_vs_fcfs"]) for r in rows if r["batching"] == mode
        )
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=mode)
    _save_ssjf_ratio(
        fig,
        ax,
        path,
        xlabel="semantic cache hit rate (%)",
        title="gain vs repeated prompts (sim, 1 worker, Poisson, rho 0.9)",
    )
    return True


def _save_ssjf_ratio(fig: Any, ax: Any, path: Path, *, xlabel: str, title: str) -> None:
    """The sensitivity plots' common frame: ssjf / fcfs against one knob, 1.0 marked."""
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("ssjf mean JCT / fcfs", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)


def write(result: dict[str, Any], cdfs: dict[str, dict[str, list[float]]], out: Path) -> list[Path]:
    """results.json, results.md and the PNGs in ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(result, indent=1, default=float))
    written[1].write_text(markdown(result) + "\n")
    for name, fn in (
        ("jct_cdf.png", lambda p: plot_cdf(result, cdfs, p)),
        ("jct_vs_load.png", lambda p: plot_load(result, p)),
        ("sensitivity_noise.png", lambda p: plot_noise(result, p)),
        ("sensitivity_cache.png", lambda p: plot_cache(result, p)),
    ):
        if fn(out / name):
            written.append(out / name)
    return written
