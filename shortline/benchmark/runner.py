"""``shortline bench``: live cells against one stack, the simulator beside them, the report.

The pieces: :mod:`.live_sweep` runs the live cells on one stack, :mod:`.calibration`
fits the simulator to them and simulates each again, :mod:`.spread` replays them
jittered, :mod:`.simulated` runs what two cores cannot run live, and :mod:`.report`
writes ``results.json``, ``results.md`` and the plots. This module puts them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.sim.service_model import RUNNING, ServiceModel
from shortline.benchmark import live
from shortline.benchmark import workload as bw
from shortline.benchmark.calibration import as_live, live_vs_sim, simulate_live_cells
from shortline.benchmark.config import LIVE_CACHE_SIZE, BenchConfig
from shortline.benchmark.live_sweep import (
    client_options,
    live_cells,
    running_setup,
    scratch_dir,
    started_stack,
)
from shortline.benchmark.report import markdown, targets, write
from shortline.benchmark.simulated import (
    aging_sweep,
    at_scale,
    azure_lengths,
    cache_sensitivity,
    noise_sensitivity,
)
from shortline.benchmark.spread import LiveDone, replay_spread
from shortline.common import paths
from shortline.common.stats import kendall_tau

log = logging.getLogger(__name__)

SIGMAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
REPEAT_SHARES = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]
AGING_RATES = [0.0, 5.0, 20.0]  # key tokens per job time at capacity
AGING_BOUNDS = [18.0, 21.0, 26.0, 33.0, 40.0]  # JCT target D, job times


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m_at_start": load,
    }


def run(cfg: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    cfg = cfg.effective()
    out = Path(cfg.out) if cfg.out else paths.run_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    pool = bw.length_pool(cfg.target_model, cfg.length_scale)
    # Live and simulated keys are the head's predictions over this (see live_sweep.live_cells).
    result["prediction_scale"] = cfg.length_scale
    result["lengths"] = {
        "set": pool.lengths.name,
        "unique_prompts": len(pool.lengths.prompts),
        "true_mean_tokens": float(pool.lengths.true_tokens.mean()),
        "live_mean_tokens": float(pool.scaled.mean()),
        "live_cv": float(pool.scaled.std() / pool.scaled.mean()),
        "length_scale": cfg.length_scale,
    }
    # Configured step until a live measurement replaces it.
    model = ServiceModel(cfg.step_a_ms / 1e3, cfg.step_b_ms / 1e3)
    live_rows: list[dict[str, Any]] = []
    sim_rows: list[dict[str, Any]] = []
    cdfs: dict[str, dict[str, list[float]]] = {}
    cells: list[LiveDone] = []
    if cfg.live:
        with contextlib.ExitStack() as es:
            stack = None
            if not cfg.address:
                print(f"starting the stack (logs in {scratch_dir(out) / 'logs'})", flush=True)
                stack = es.enter_context(started_stack(cfg, out))
            server = client_options(cfg, stack)
            asyncio.run(live.wait_for_workers(server, cfg.workers))
            if stack is None:
                # A running stack keeps its own policy and batching: one cell per load.
                running = asyncio.run(running_setup(server))
                cfg = dataclasses.replace(cfg, policies=running[0], batching=running[1])
                result["config"] = dataclasses.asdict(cfg)
            probe_batch = cfg.slots if cfg.modes() == ["continuous"] or stack else 1
            steps = asyncio.run(
                live.measure_step_times(server, length_model=cfg.target_model, batch=probe_batch)
            )
            if probe_batch == 1:
                # One sequence at a time cannot separate a from b: take b as configured.
                b = cfg.step_b_ms / 1e3
                steps = dataclasses.replace(steps, a_s=max(1e-4, steps.one_s - b), b_s=b)
            model = ServiceModel(steps.a_s, steps.b_s)
            result["calibration"] = dataclasses.asdict(steps)
            print(
                f"measured replay step: a = {steps.a_s * 1e3:.2f} ms, b = {steps.b_s * 1e3:.3f} ms "
                f"(configured {cfg.step_a_ms:g} + {cfg.step_b_ms:g} * batch)",
                flush=True,
            )
            live_rows, cells, cdfs, caps = live_cells(
                cfg, pool, as_live(model), stack, server, out, progress
            )
            result["capacity"] = caps
        sim_rows, fit = simulate_live_cells(cfg, cells, model)
        result["calibration"].update(fit)
        if cfg.spread_replays > 0:
            print(f"replaying the live cells {cfg.spread_replays} times, jittered", flush=True)
            result["replay_spread"] = replay_spread(
                cells,
                as_live(model),
                slots=cfg.slots,
                workers=cfg.workers,
                slo_factor=cfg.slo_factor,
                cache_size=LIVE_CACHE_SIZE,
                run_overhead_s=fit["run_overhead_s"],
                join_delay_s=fit["join_delay_s"],
                replays=cfg.spread_replays,
                seed=cfg.seed,
            )
        for r in live_vs_sim(live_rows, sim_rows):
            print(
                f"{r['batching']}-{r['rho']:g}-{r['policy']}: live {r['live_mean_jct_s']:.2f} s, "
                f"sim {r['sim_mean_jct_s']:.2f} s ({r['sim_over_live']:.3f})",
                flush=True,
            )
    # The step and the dynamic-batch charge of the at-scale, reference and sensitivity runs.
    result["step_model"] = {
        "a_s": model.step_a_s,
        "b_s": model.step_b_s,
        "dynamic_charge": model.dynamic_charge,
        "live_dynamic_charge": RUNNING,
    }
    result["live"] = live_rows
    result["sim_same_settings"] = sim_rows
    result["live_vs_sim"] = live_vs_sim(live_rows, sim_rows)
    sims, target_rows = simulated_sweeps(cfg, model, pool)
    result.update(sims)
    result["wall_s"] = time.time() - started
    result["targets"] = targets(live_rows, target_rows)
    write(result, cdfs, out)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and PNGs", flush=True)
    return result


def simulated_sweeps(
    cfg: BenchConfig, model: ServiceModel, pool: bw.LengthPool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The simulated results of a run: what two cores cannot run live (production lengths,
    big clusters, many requests), the issue-7 reference, the Azure trace's lengths, the
    ssjf-aging sweep and the sensitivity studies; (result entries, rows for the targets)."""
    result: dict[str, Any] = {}
    common: dict[str, Any] = {
        "requests": cfg.sim_requests,
        "trace": cfg.trace,
        "target_model": cfg.target_model,
        "slots": cfg.slots,
        "model": model,
        "batch_wait_ms": cfg.batch_wait_ms,
        "seed": cfg.seed,
    }
    at_scale_rows: list[dict[str, Any]] = []
    sizes = [int(w) for w in cfg.sim_workers.split(",") if w.strip()]
    for w in sizes:
        print(f"simulating {w} workers, {cfg.sim_requests} requests per cell", flush=True)
        at_scale_rows += at_scale(
            workers=w,
            rho=0.9,
            batching=cfg.batching,
            policies=cfg.policies,
            **common,
        )
    load_rows: list[dict[str, Any]] = []
    if sizes:
        for rho in sorted({0.5, 0.7, 0.9, 1.1, *cfg.rhos()}):
            load_rows += at_scale(
                workers=sizes[0], rho=rho, batching=cfg.batching, policies=cfg.policies, **common
            )
    # The issue-7 reference setting, where its limits were measured: one worker, Poisson
    # arrivals, rho 0.9, so a queue forms (at 64 workers the pooled slots rarely leave a
    # job waiting). The Azure-lengths, aging-sweep and sensitivity runs use it too.
    reference: dict[str, Any] = {
        **common,
        "trace": "poisson",
        "requests": cfg.sensitivity_requests,
        "workers": 1,
        "rho": 0.9,
    }
    print("simulating the issue-7 reference: 1 worker, Poisson, rho 0.9", flush=True)
    ref_rows = at_scale(batching=cfg.batching, policies=cfg.policies, **reference)
    result["sim_reference"] = ref_rows
    # The Azure trace's own lengths, at the head's tau and at issue 3's target tau.
    head_tau = kendall_tau(pool.predicted, pool.lengths.true_tokens.astype(np.float64))
    print(f"simulating the Azure trace's lengths, noise at tau {head_tau:.2f} and 0.60", flush=True)
    azure_rows = azure_lengths(
        [head_tau, 0.60],
        batching=cfg.batching,
        policies=cfg.policies,
        common=reference,
    )
    result["sim_azure_lengths"] = azure_rows
    print("simulating an ssjf-aging sweep at the reference setting", flush=True)
    result["aging_sweep"] = aging_sweep(
        AGING_RATES,
        AGING_BOUNDS,
        reference=[r for r in ref_rows if r["batching"] != "dynamic"],
        common=reference,
    )
    result["sim_at_scale"] = at_scale_rows
    result["sim_load"] = load_rows
    print("sensitivity: predictor noise and cache hit rate", flush=True)
    modes = ",".join(m for m in cfg.modes() if m != "dynamic") or "continuous"
    result["sensitivity_noise"] = noise_sensitivity(SIGMAS, modes=modes, common=reference)
    result["sensitivity_cache"] = cache_sensitivity(REPEAT_SHARES, modes=modes, common=reference)
    return result, ref_rows + at_scale_rows + azure_rows


def main(cfg: BenchConfig) -> int:
    logging.basicConfig(level=logging.WARNING)
    result = run(cfg)
    md = markdown(result)
    print(md)
    return 0 if all(r.get("errors", 0) == 0 for r in result["live"]) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(BenchConfig(quick=True)))
