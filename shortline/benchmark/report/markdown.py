"""``results.md``: the run's settings and calibration in prose, then every table in order."""

from __future__ import annotations

import math
from typing import Any

from shortline.benchmark.report.formatting import fmt, md_table
from shortline.benchmark.report.tables import (
    aging_table,
    at_scale_table,
    latency_table,
    live_vs_sim_table,
    sensitivity_tables,
    spread_tables,
    targets_table,
    throughput_table,
)


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
            md_table(
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
                        fmt(c["capacity_rps"]),
                        fmt(c["capacity_tps"], 0),
                        fmt(c["aging_rate"], 1),
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
