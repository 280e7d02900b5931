"""The simulator fitted to the live cells, and every live cell simulated again.

What the simulator needs to predict a live cell, measured on the live runs
themselves: the step ``a + b * batch`` under load (:func:`fit_step`), the set-up
time of a lone run without batching (:func:`run_overhead`) and the delay before a
dispatched run joins a batch (:func:`join_delay`). :func:`simulate_live_cells` then
runs each cell again with them, and :func:`live_vs_sim` sets the two side by side.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from services.scheduler.sim.service_model import RUNNING, ServiceModel
from shortline.benchmark.config import LIVE_CACHE_SIZE, BenchConfig
from shortline.benchmark.simulated import sim_cell
from shortline.benchmark.spread import LiveDone
from shortline.benchmark.summary import ORACLE_POLICY, RATIOS, RequestTimes, summarize
from shortline.common.stats import add_ratios


def as_live(model: ServiceModel) -> ServiceModel:
    """``model`` as the live stack runs it: a dynamic batch pays only for its running jobs.

    The replay engine drops a finished sequence before its next step, while the scheduler
    holds the batch's slots until its last job ends; the live cells' arrival rate (through
    capacity) and their simulation use this. The at-scale figures keep the padded default
    (a GPU without iteration-level scheduling), the case dynamic batching stands for.
    """
    return dataclasses.replace(model, dynamic_charge=RUNNING)


def run_overhead(times: RequestTimes, step_one_s: float) -> float:
    """Per-run set-up time of a lone worker without batching, from a live cell.

    With one slot, a job that was already queued when the previous one finished starts
    right then, so the gap between the two finishes is its tokens times the step plus
    whatever the dispatch and stream set-up cost; the median of that excess is the cost.
    """
    order = np.argsort(times.finish)
    fin = times.finish[order]
    arr = times.arrival[order]
    tok = times.tokens[order].astype(np.float64)
    ok = ~np.isnan(fin)
    fin, arr, tok = fin[ok], arr[ok], tok[ok]
    queued = arr[1:] < fin[:-1]
    excess = (fin[1:] - fin[:-1] - tok[1:] * step_one_s)[queued]
    return max(0.0, float(np.median(excess))) if excess.size >= 5 else 0.0


def join_delay(times: RequestTimes) -> float:
    """How long a dispatched run holds its slot before it decodes, beyond one step.

    Per request: dispatch to first token (first token - arrival - the scheduler's queue
    wait) less its own mean step (finish - first token) / (tokens - 1); the median. The
    Execute call travels to the engine and then waits for the next step boundary; the
    simulator's fluid batch would start the run at once.
    """
    ok = (
        ~np.isnan(times.first_token)
        & ~np.isnan(times.finish)
        & ~np.isnan(times.wait)
        & (times.tokens > 5)
    )
    if times.preemptions is not None:
        ok &= times.preemptions == 0
    if np.count_nonzero(ok) < 5:
        return 0.0
    first = times.first_token[ok] - times.arrival[ok] - times.wait[ok]
    step = (times.finish[ok] - times.first_token[ok]) / (times.tokens[ok] - 1)
    return max(0.0, float(np.median(first - step)))


def fit_step(cells: list[RequestTimes]) -> tuple[float, float]:
    """``a + b * n`` fitted to the live runs themselves.

    Per request: its mean step, (finish - first token) / (tokens - 1), against the mean
    number of requests running beside it (itself included) over that interval. This is
    the step the stack really delivered under load, pipeline and CPU contention included,
    which a probe on an idle stack underestimates.
    """
    xs: list[float] = []
    ys: list[float] = []
    for t in cells:
        ok = ~np.isnan(t.finish) & ~np.isnan(t.first_token) & (t.tokens > 5)
        s, f, k = t.first_token[ok], t.finish[ok], t.tokens[ok].astype(np.float64)
        if s.size == 0:
            continue
        overlap = np.clip(
            np.minimum(f[:, None], f[None, :]) - np.maximum(s[:, None], s[None, :]), 0, None
        )
        dur = f - s
        keep = dur > 0
        xs += (overlap.sum(axis=1)[keep] / dur[keep]).tolist()
        ys += (dur[keep] / (k[keep] - 1)).tolist()
    x = np.asarray(xs)
    y = np.asarray(ys)
    if x.size < 3 or np.ptp(x) < 0.5:
        return math.nan, math.nan
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def simulate_live_cells(
    cfg: BenchConfig, cells: list[LiveDone], probe: ServiceModel
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every live cell again in the simulator, with the step fitted on the live runs.

    Without batching a worker also idles while the next run is set up: measured on the
    live cells and given to the simulator as a stall of the worker (the replay engine
    times a lone job's first step from the previous step's end, which hides most of it).
    With batching the replay engine keeps stepping the others meanwhile, and the new run
    joins at the next step boundary: its slot is held for the measured join delay while
    the batch goes on (:func:`join_delay`). A dynamic batch is charged only for its
    running jobs, as the replay engine does (:func:`as_live`). Predictions are not capped
    at max_tokens, as in the benchmark-mode scheduler (there max_tokens is the true length).
    """
    probe = as_live(probe)
    a, b = fit_step([c.times for c in cells])
    fitted = as_live(ServiceModel(a, b)) if not math.isnan(a) and a > 0 and b >= 0 else probe
    calib: dict[str, Any] = {"fit_a_s": fitted.step_a_s, "fit_b_s": fitted.step_b_s}
    overheads: dict[str, float] = {}
    joins: dict[str, float] = {}
    for mode in dict.fromkeys(c.mode for c in cells):
        mine = [c for c in cells if c.mode == mode]
        costs = [run_overhead(c.times, fitted.step(1)) for c in mine]
        overheads[mode] = (
            float(np.median(costs)) if mode == "none" and cfg.workers == 1 and costs else 0.0
        )
        joins[mode] = (
            float(np.median([join_delay(c.times) for c in mine])) if mode != "none" else 0.0
        )
    calib["run_overhead_s"] = overheads
    calib["join_delay_s"] = joins
    rows: list[dict[str, Any]] = []
    for c in cells:
        srow: dict[str, Any] = {}
        for m, key in ((fitted, ""), (probe, "probe_")):
            m = dataclasses.replace(m, run_overhead_s=overheads[c.mode], join_delay_s=joins[c.mode])
            times, counters = sim_cell(
                c.work,
                c.policy,
                c.batching,
                workers=cfg.workers,
                slots=cfg.slots,
                model=m,
                params=c.params,
                cache_size=LIVE_CACHE_SIZE,
            )
            got = summarize(times, step_one_s=probe.step(1), slo_factor=cfg.slo_factor)
            if key:
                srow["probe_mean_jct_s"] = got["mean_jct_s"]
            else:
                srow.update(got)
                srow.update(
                    preemptions=counters.preemptions,
                    late_jobs=counters.late_jobs,
                    token_time_s=counters.token_time_s,
                )
        srow.update(
            source="sim",
            batching=c.mode,
            rho=c.rho,
            policy=c.policy,
            run_overhead_s=overheads[c.mode],
            join_delay_s=joins[c.mode],
        )
        rows.append(srow)
    add_ratios(rows, ("batching", "rho"), RATIOS, oracle=ORACLE_POLICY)
    return rows, calib


def live_vs_sim(
    live_rows: list[dict[str, Any]], sim_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    sims = {(r["batching"], r["rho"], r["policy"]): r for r in sim_rows}
    out = []
    for r in live_rows:
        s = sims.get((r["batching"], r["rho"], r["policy"]))
        if s is None:
            continue
        out.append(
            {
                "batching": r["batching"],
                "rho": r["rho"],
                "policy": r["policy"],
                "live_mean_jct_s": r["mean_jct_s"],
                "sim_mean_jct_s": s["mean_jct_s"],
                "sim_over_live": s["mean_jct_s"] / r["mean_jct_s"],
                "sim_probe_mean_jct_s": s.get("probe_mean_jct_s", float("nan")),
                "run_overhead_s": s.get("run_overhead_s", 0.0),
                "join_delay_s": s.get("join_delay_s", 0.0),
                "live_mean_jct_vs_fcfs": r.get("mean_jct_vs_fcfs", float("nan")),
                "sim_mean_jct_vs_fcfs": s.get("mean_jct_vs_fcfs", float("nan")),
                "live_late_jobs": r.get("late_jobs", 0),
                "sim_late_jobs": s.get("late_jobs", 0),
                "live_token_time_s": r.get("token_time_s", 0.0),
                "sim_token_time_s": s.get("token_time_s", 0.0),
            }
        )
    return out
