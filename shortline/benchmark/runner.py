"""``shortline bench``: live cells against one stack, the simulator beside them, the report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.core.batching import Batching
from services.scheduler.sim.service_model import RUNNING, ServiceModel, capacity
from shortline.benchmark import live, report
from shortline.benchmark import workload as bw
from shortline.benchmark.config import BenchConfig
from shortline.benchmark.metrics import RequestTimes, add_ratios, summarize
from shortline.benchmark.simulated import (
    PolicyParams,
    aging_sweep,
    at_scale,
    azure_lengths,
    cache_sensitivity,
    kendall_tau,
    noise_sensitivity,
    sim_cell,
)
from shortline.benchmark.spread import CellSetup, replay_spread
from shortline.common import paths

log = logging.getLogger(__name__)

SIGMAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
REPEAT_SHARES = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]
AGING_RATES = [0.0, 5.0, 20.0]  # key tokens per job time at capacity
AGING_BOUNDS = [18.0, 21.0, 26.0, 33.0, 40.0]  # JCT target D, job times
# The live scheduler's semantic cache holds one prompt: a cell draws its 1,000 requests
# from the 173 test prompts, so a full cache would hand ssjf the true length of nearly
# every request and measure the cache, not the predictor (the sensitivity study does that).
LIVE_CACHE_SIZE = 1


def as_live(model: ServiceModel) -> ServiceModel:
    """``model`` as the live stack runs it: a dynamic batch pays only for its running jobs.

    The replay engine drops a finished sequence before its next step, while the scheduler
    holds the batch's slots until its last job ends; the live cells' arrival rate (through
    capacity) and their simulation use this. The at-scale figures keep the padded default
    (a GPU without iteration-level scheduling), the case dynamic batching stands for.
    """
    return dataclasses.replace(model, dynamic_charge=RUNNING)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _scratch(out: Path) -> Path:
    """Logs and the outcome log stay under .run, out of an output folder that may be committed."""
    path = paths.run_dir() / "bench" / "scratch" / out.resolve().name
    path.mkdir(parents=True, exist_ok=True)
    return path


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


@contextlib.contextmanager
def _stack(cfg: BenchConfig, out: Path) -> Iterator[Any]:
    from shortline.stack import Stack, StackConfig, port_is_free

    p = _free_ports(6)
    rng = np.random.default_rng()
    while True:  # blocks for base + i ports, clear of the single picks above
        base = int(rng.integers(20_000, 30_000))
        block = range(base, base + 2 * cfg.workers + 4)
        if all(port_is_free("127.0.0.1", q) and q not in p for q in block):
            break
    scfg = StackConfig(
        scheduler_port=p[0],
        predictor_port=p[1],
        worker_base_port=base + 2 + cfg.workers,
        triton_grpc_port=p[2],
        triton_http_port=p[3],
        triton_metrics_port=p[4],
        metrics_base_port=base,
        workers=cfg.workers,
        slots=cfg.slots,
        policy="fcfs",
        batching="continuous",
        replay_step_a_ms=cfg.step_a_ms,
        replay_step_b_ms=cfg.step_b_ms,
        triton_models="replay",
        log_dir=str(_scratch(out) / "logs"),
    )
    stack = Stack(scfg)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _scheduler_args(cfg: BenchConfig, params: PolicyParams, out: Path) -> str:
    return " ".join(
        [
            "--benchmark-mode",
            "--queue-limit",
            "1000000",
            "--predictor-timeout-ms",
            "5000",
            "--slots",
            str(cfg.slots),
            "--batch-wait-ms",
            f"{cfg.batch_wait_ms:g}",
            "--cache-size",
            str(LIVE_CACHE_SIZE),
            "--outcome-log",
            str(_scratch(out) / "outcomes.sqlite"),
            "--prediction-scale",
            f"{cfg.length_scale:g}",
            *params.scheduler_flags(),
        ]
    )


async def _running_setup(address: str) -> tuple[str, str]:
    """(policy, batching) of the scheduler at ``address``."""
    from shortline.client import AsyncShortlineClient, ClientOptions

    async with AsyncShortlineClient(ClientOptions(target=address, timeout_seconds=5)) as client:
        stats = await client.stats()
    return str(stats.policy), str(stats.batching)


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
    # Live and simulated keys are the head's predictions over this (see _live_cells).
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
            address = cfg.address
            if not address:
                print(f"starting the stack (logs in {_scratch(out) / 'logs'})", flush=True)
                stack = es.enter_context(_stack(cfg, out))
                address = stack.scheduler_address
            asyncio.run(live.wait_for_workers(address, cfg.workers))
            if stack is None:
                # A running stack keeps its own policy and batching: one cell per load.
                running = asyncio.run(_running_setup(address))
                cfg = dataclasses.replace(cfg, policies=running[0], batching=running[1])
                result["config"] = dataclasses.asdict(cfg)
            probe_batch = cfg.slots if cfg.modes() == ["continuous"] or stack else 1
            steps = asyncio.run(
                live.measure_step_times(address, length_model=cfg.target_model, batch=probe_batch)
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
            live_rows, cells, cdfs, caps = _live_cells(
                cfg, pool, as_live(model), stack, address, out, progress
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
        for r in _live_vs_sim(live_rows, sim_rows):
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
    result["live_vs_sim"] = _live_vs_sim(live_rows, sim_rows)
    # What two cores cannot run live: production lengths, big clusters, many requests.
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
    result["wall_s"] = time.time() - started
    result["targets"] = report.targets(live_rows, ref_rows + at_scale_rows + azure_rows)
    report.write(result, cdfs, out)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and PNGs", flush=True)
    return result


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


def _live_cells(
    cfg: BenchConfig,
    pool: bw.LengthPool,
    model: ServiceModel,
    stack: Any,
    address: str,
    out: Path,
    progress: bool,
) -> tuple[
    list[dict[str, Any]],
    list[LiveDone],
    dict[str, dict[str, list[float]]],
    list[dict[str, Any]],
]:
    live_rows: list[dict[str, Any]] = []
    cells: list[LiveDone] = []
    cdfs: dict[str, dict[str, list[float]]] = {}
    caps: list[dict[str, Any]] = []
    requests_dump: dict[str, dict[str, list[float]]] = {}
    # The scheduler divides the head's predictions by the length scale (--prediction-scale),
    # as the replayed lengths were: remaining work (predicted - generated), which preemption
    # and ssjf-aging use, needs one unit. The aging rate is in those keys' units.
    key_per_token = 1.0 / cfg.length_scale
    for mode in cfg.modes():
        batching = Batching.parse(mode, cfg.slots, cfg.batch_wait_ms / 1e3)
        cap = capacity(
            model, batching, cfg.workers, cfg.slots, pool.scaled, pool.lengths.prompt_tokens
        )
        per_job = cfg.workers / cap
        params = PolicyParams.scaled(per_job, key_per_token, mode)
        cap_row: dict[str, Any] = {
            "batching": mode,
            "capacity_rps": cap,
            "capacity_tps": cap * float(pool.scaled.mean()),
            "aging_rate": params.aging_rate,
            "jct_target_s": {},
        }
        caps.append(cap_row)
        print(
            f"{mode}: capacity {cap:.2f} req/s = {cap * pool.scaled.mean():.0f} tokens/s",
            flush=True,
        )
        done: list[tuple[float, str, bw.BenchWorkload, RequestTimes, PolicyParams]] = []
        for rho in cfg.rhos():
            work = bw.build(pool, n=cfg.requests, rate=rho * cap, trace=cfg.trace, seed=cfg.seed)
            # ssjf-aging's JCT target is the operator's SLO; here it is set from the p99
            # JCT the fcfs cell of this load just measured (fcfs runs first), as an
            # operator would set it from the p99 they have today.
            cell_params = params
            for policy in cfg.policy_list():
                cell = f"{mode}-{rho:g}-{policy}"
                if stack is not None:
                    stack.restart_scheduler(policy, mode, _scheduler_args(cfg, cell_params, out))
                    asyncio.run(live.wait_for_workers(address, cfg.workers))
                got = asyncio.run(
                    live.run_cell(
                        address,
                        work,
                        length_model=cfg.target_model,
                        cell_id=f"{cell}-{int(time.time())}",
                        progress_desc=cell if progress else None,
                    )
                )
                row = summarize(got.times, step_one_s=model.step(1), slo_factor=cfg.slo_factor)
                exact = int(
                    np.count_nonzero(
                        (got.tokens_seen == work.true_tokens)
                        & (got.actual_tokens == work.true_tokens)
                    )
                )
                sources: dict[str, int] = {}
                for src in got.sources:
                    sources[src] = sources.get(src, 0) + 1
                row.update(
                    source="live",
                    batching=mode,
                    rho=rho,
                    policy=policy,
                    exact_length=exact,
                    errors=len(got.errors),
                    error_examples=got.errors[:3],
                    prediction_sources=sources,
                    max_send_lag_s=float(got.send_lag_s.max()),
                    # The live predictor against the offline head the simulator uses.
                    prediction_median_rel_diff=float(
                        np.nanmedian(
                            np.abs(got.predicted * cfg.length_scale / work.predicted - 1.0)
                        )
                    ),
                    wall_s=got.wall_s,
                )
                late, token_time = asyncio.run(live.guard_stats(address))
                row.update(late_jobs=late, token_time_s=token_time)
                live_rows.append(row)
                jct = got.times.finish - got.times.arrival
                cdfs[cell] = {"jct": sorted(jct.tolist())}
                requests_dump[cell] = {
                    "arrival": got.times.arrival.tolist(),
                    "wait": got.times.wait.tolist(),
                    "finish": got.times.finish.tolist(),
                    "first_token": got.times.first_token.tolist(),
                    "tokens": got.times.tokens.tolist(),
                    "predicted_live": got.predicted.tolist(),
                }
                done.append((rho, policy, work, got.times, cell_params))
                if policy == "fcfs" and row["p99_jct_s"] > 0:
                    cell_params = params.with_fcfs_p99(row["p99_jct_s"], mode)
                    cap_row["jct_target_s"][f"{rho:g}"] = cell_params.jct_target_s
                print(
                    f"{cell}: live mean JCT {row['mean_jct_s']:.2f} s, "
                    f"exact lengths {exact}/{len(work)}, errors {len(got.errors)}",
                    flush=True,
                )
        cells += [LiveDone(mode, batching, q, r, p, w, g) for r, p, w, g, q in done]
    add_ratios(live_rows, ("batching", "rho"))
    dump = _scratch(out) / "live_requests.json"
    dump.write_text(json.dumps(requests_dump))
    return live_rows, cells, cdfs, caps


@dataclasses.dataclass(frozen=True)
class LiveDone(CellSetup):
    """One finished live cell: its setup and what it measured."""

    times: RequestTimes


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
    add_ratios(rows, ("batching", "rho"))
    return rows, calib


def _live_vs_sim(
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


def main(cfg: BenchConfig) -> int:
    logging.basicConfig(level=logging.WARNING)
    result = run(cfg)
    md = report.markdown(result)
    print(md)
    return 0 if all(r.get("errors", 0) == 0 for r in result["live"]) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(BenchConfig(quick=True)))
