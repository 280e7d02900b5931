"""The live cells of ``shortline bench``: one stack, every policy and load run against it.

The benchmark starts its own stack (free ports, the replay model in Triton) unless
given the address of a running one, restarts the scheduler with each cell's policy
and settings, replays the cell's requests through the client and summarises them.
Logs, the outcome log and the per-request dump stay under ``.run`` (:func:`scratch_dir`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.core.batching import Batching
from services.scheduler.sim.service_model import ServiceModel, capacity
from shortline.benchmark import live
from shortline.benchmark import workload as bw
from shortline.benchmark.config import LIVE_CACHE_SIZE, BenchConfig
from shortline.benchmark.simulated import PolicyParams
from shortline.benchmark.spread import LiveDone
from shortline.benchmark.summary import ORACLE_POLICY, RATIOS, RequestTimes, summarize
from shortline.client import AsyncShortlineClient, ClientOptions
from shortline.common import paths
from shortline.common.net import free_ports
from shortline.common.stats import add_ratios
from shortline.stack import Stack, StackConfig, port_is_free


def scratch_dir(out: Path) -> Path:
    """Logs and the outcome log stay under .run, out of an output folder that may be committed."""
    path = paths.run_dir() / "bench" / "scratch" / out.resolve().name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def started_stack(cfg: BenchConfig, out: Path) -> Iterator[Stack]:
    p = free_ports(6)
    rng = np.random.default_rng()
    while True:  # blocks for base + i ports, clear of the single picks above
        base = int(rng.integers(20_000, 30_000))
        block = range(base, base + 2 * cfg.workers + 4)
        if all(port_is_free("127.0.0.1", q) and q not in p for q in block):
            break
    scfg = StackConfig(
        scheduler_port=p[0],
        scheduler_internal_port=p[5],
        predictor_port=p[1],
        worker_base_port=base + 2 + cfg.workers,
        triton_grpc_port=p[2],
        triton_http_port=p[3],
        triton_metrics_port=p[4],
        gateway=False,  # the sweep talks gRPC; no gateway port to find
        metrics_base_port=base,
        workers=cfg.workers,
        slots=cfg.slots,
        policy="fcfs",
        batching="continuous",
        replay_step_a_ms=cfg.step_a_ms,
        replay_step_b_ms=cfg.step_b_ms,
        triton_models="replay",
        log_dir=str(scratch_dir(out) / "logs"),
        tls=cfg.tls,
        certs_dir=str(scratch_dir(out) / "certs") if cfg.tls else "",
        tokens_file=str(scratch_dir(out) / "tokens.toml") if cfg.tls else "",
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
            str(scratch_dir(out) / "outcomes.sqlite"),
            "--prediction-scale",
            f"{cfg.length_scale:g}",
            *params.scheduler_flags(),
        ]
    )


def client_options(cfg: BenchConfig, stack: Stack | None) -> ClientOptions:
    """How the benchmark reaches the scheduler: the stack it started (its CA and token
    with --tls), or --address with --tls / --ca / --token-file."""
    if stack is not None:
        return stack.client_options()
    return ClientOptions.from_files(
        cfg.address,
        ca_file=cfg.ca or None,
        token_file=cfg.token_file or None,
        tls=cfg.tls,
    )


async def running_setup(server: ClientOptions) -> tuple[str, str]:
    """(policy, batching) of the scheduler ``server`` reaches."""
    async with AsyncShortlineClient(dataclasses.replace(server, timeout_seconds=5)) as client:
        stats = await client.stats()
    return str(stats.policy), str(stats.batching)


def live_cells(
    cfg: BenchConfig,
    pool: bw.LengthPool,
    model: ServiceModel,
    stack: Stack | None,
    server: ClientOptions,
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
                    asyncio.run(live.wait_for_workers(server, cfg.workers))
                got = asyncio.run(
                    live.run_cell(
                        server,
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
                late, token_time = asyncio.run(live.guard_stats(server))
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
    add_ratios(live_rows, ("batching", "rho"), RATIOS, oracle=ORACLE_POLICY)
    dump = scratch_dir(out) / "live_requests.json"
    dump.write_text(json.dumps(requests_dump))
    return live_rows, cells, cdfs, caps
