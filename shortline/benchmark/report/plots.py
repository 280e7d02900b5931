"""The PNG plots of a benchmark run (matplotlib, loaded only when a plot is drawn)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

POLICY_ORDER = ["fcfs", "ssjf", "ssjf-aging", "ssjf+preempt", "sjf-oracle"]


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
