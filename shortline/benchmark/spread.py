"""How far one live run can move: the live cells replayed in the simulator with jitter.

A cell's outcome is chaotic in its timing. Shifting every arrival by a few
milliseconds reorders the queue inside a burst, and the order then cascades:
with Azure's bursts at rho 0.9, eight replays of the ssjf-aging cell without
batching (docs/benchmarks.md) ranged from 0.81 to 0.87 of fcfs's mean JCT. So
one live run is one draw, and a target within that spread is not settled by it.
Each replay here shifts every arrival by a uniform 0..``jitter_s`` (the
predictor's and the network's milliseconds) and scales the step by
``N(1, step_sd)`` (the run-to-run drift of the measured step), the same for
every policy of the replay, so ratios to fcfs stay paired; then the issue-7
targets are judged on each replay.

    python -m shortline.benchmark.spread RESULTS_JSON [--replays N] [--predictions true]

adds the spread to a finished run's ``results.json`` and rewrites its
``results.md``, rebuilding the cells from the saved settings. With
``--predictions true`` every cell is replayed with a perfect predictor (each
prediction is the replayed true length) and stored apart
(``replay_spread_true``): a target that this still misses is missed by the
policy on these arrivals, not by the predictor's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.core.batching import Batching
from services.scheduler.sim.service_model import RUNNING, ServiceModel
from shortline.benchmark import workload as bw
from shortline.benchmark.config import LIVE_CACHE_SIZE, BenchConfig
from shortline.benchmark.report.markdown import markdown
from shortline.benchmark.report.tables import spread_tables
from shortline.benchmark.report.targets import targets
from shortline.benchmark.simulated import PolicyParams, sim_cell
from shortline.benchmark.summary import ORACLE_POLICY, RATIOS, RequestTimes, summarize
from shortline.common.stats import add_ratios

JITTER_S = 0.010
STEP_SD = 0.01


@dataclass(frozen=True)
class CellSetup:
    """What the simulator needs to run one live cell again."""

    mode: str
    batching: Batching
    params: PolicyParams
    rho: float
    policy: str
    work: bw.BenchWorkload


@dataclass(frozen=True)
class LiveDone(CellSetup):
    """One finished live cell: its setup and what it measured."""

    times: RequestTimes


def replay_spread(
    cells: Sequence[CellSetup],
    probe: ServiceModel,
    *,
    slots: int,
    workers: int,
    slo_factor: float,
    cache_size: int,
    run_overhead_s: dict[str, float],
    join_delay_s: dict[str, float],
    replays: int,
    seed: int = 0,
    jitter_s: float = JITTER_S,
    step_sd: float = STEP_SD,
) -> dict[str, Any]:
    """Per cell the replays' mean and p99 JCT over fcfs; per target how many replays meet it."""
    rng = np.random.default_rng(seed)
    per_cell: dict[tuple[str, float, str], dict[str, list[float]]] = {}
    per_target: dict[tuple[str, str], dict[str, Any]] = {}
    for _ in range(replays):
        scale = max(0.5, 1.0 + step_sd * float(rng.standard_normal()))
        arrivals: dict[tuple[str, float], np.ndarray] = {}
        rows: list[dict[str, Any]] = []
        for c in cells:
            key = (c.mode, c.rho)
            if key not in arrivals:
                shifted = c.work.arrivals + rng.uniform(0.0, jitter_s, size=len(c.work))
                arrivals[key] = np.maximum.accumulate(shifted)
            model = dataclasses.replace(
                probe,
                step_a_s=probe.step_a_s * scale,
                step_b_s=probe.step_b_s * scale,
                run_overhead_s=run_overhead_s.get(c.mode, 0.0),
                join_delay_s=join_delay_s.get(c.mode, 0.0),
            )
            times, _ = sim_cell(
                dataclasses.replace(c.work, arrivals=arrivals[key]),
                c.policy,
                c.batching,
                workers=workers,
                slots=slots,
                model=model,
                params=c.params,
                cache_size=cache_size,
            )
            row = summarize(times, step_one_s=probe.step(1), slo_factor=slo_factor)
            row.update(batching=c.mode, rho=c.rho, policy=c.policy)
            rows.append(row)
        add_ratios(rows, ("batching", "rho"), RATIOS, oracle=ORACLE_POLICY)
        for r in rows:
            got = per_cell.setdefault(
                (r["batching"], r["rho"], r["policy"]), {"mean": [], "p99": []}
            )
            got["mean"].append(r["mean_jct_vs_fcfs"])
            got["p99"].append(r["p99_jct_vs_fcfs"])
        for t in targets(rows, []):
            agg = per_target.setdefault(
                (t["target"], t["batching"]),
                {"target": t["target"], "batching": t["batching"], "met": 0, "values": []},
            )
            agg["met"] += int(t["met"])
            agg["values"].append(t["value"])
    return {
        "replays": replays,
        "jitter_s": jitter_s,
        "step_sd": step_sd,
        "cells": [
            {
                "batching": b,
                "rho": rho,
                "policy": p,
                "mean_jct_vs_fcfs": v["mean"],
                "p99_jct_vs_fcfs": v["p99"],
            }
            for (b, rho, p), v in per_cell.items()
        ],
        "targets": list(per_target.values()),
    }


def cells_from_result(result: dict[str, Any]) -> list[CellSetup]:
    """The live cells of a finished run, rebuilt from its saved settings (same requests)."""
    cfg = BenchConfig(**result["config"])
    if result.get("prediction_scale") != cfg.length_scale:
        raise ValueError(
            "this results.json predates predictions scaled with the replayed lengths "
            "(its cells cannot be rebuilt as they ran): rerun shortline bench"
        )
    pool = bw.length_pool(cfg.target_model, cfg.length_scale)
    caps = {c["batching"]: c for c in result["capacity"]}
    out: list[CellSetup] = []
    for mode in cfg.modes():
        cap = caps[mode]
        batching = Batching.parse(mode, cfg.slots, cfg.batch_wait_ms / 1e3)
        base = PolicyParams.scaled(cfg.workers / cap["capacity_rps"], 1.0 / cfg.length_scale, mode)
        for rho in cfg.rhos():
            work = bw.build(
                pool, n=cfg.requests, rate=rho * cap["capacity_rps"], trace=cfg.trace, seed=cfg.seed
            )
            target = cap.get("jct_target_s", {}).get(f"{rho:g}")
            for policy in cfg.policy_list():
                # fcfs runs first; the cells after it got the target its p99 set.
                params = (
                    dataclasses.replace(base, jct_target_s=target)
                    if target is not None and policy != "fcfs"
                    else base
                )
                out.append(CellSetup(mode, batching, params, rho, policy, work))
    return out


def with_true_predictions(cells: Sequence[CellSetup]) -> list[CellSetup]:
    """The same cells with a perfect predictor: each prediction is the true replayed length
    (in the head's unscaled unit, as ``BenchWorkload.predicted`` holds it)."""
    return [
        dataclasses.replace(
            c,
            work=dataclasses.replace(
                c.work, predicted=c.work.true_tokens.astype(np.float64) * c.work.length_scale
            ),
        )
        for c in cells
    ]


SPREAD_KEYS = {"head": "replay_spread", "true": "replay_spread_true"}


def add_to_result(
    result: dict[str, Any], replays: int, cache_size: int, predictions: str = "head"
) -> dict[str, Any]:
    """``result[SPREAD_KEYS[predictions]]`` for a finished run's live cells: with the
    head's predictions as they ran (``head``) or with the true lengths (``true``)."""
    if predictions not in SPREAD_KEYS:
        raise ValueError(
            f"predictions must be one of {', '.join(SPREAD_KEYS)}, got {predictions!r}"
        )
    cfg = BenchConfig(**result["config"])
    cal = result["calibration"]
    probe = dataclasses.replace(ServiceModel(cal["a_s"], cal["b_s"]), dynamic_charge=RUNNING)
    cells = cells_from_result(result)
    if predictions == "true":
        cells = with_true_predictions(cells)
    spread = replay_spread(
        cells,
        probe,
        slots=cfg.slots,
        workers=cfg.workers,
        slo_factor=cfg.slo_factor,
        cache_size=cache_size,
        run_overhead_s=cal.get("run_overhead_s", {}),
        join_delay_s=cal.get("join_delay_s", {}),
        replays=replays,
    )
    spread["predictions"] = predictions
    result[SPREAD_KEYS[predictions]] = spread
    return spread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json of a shortline bench run")
    parser.add_argument("--replays", type=int, default=8)
    parser.add_argument(
        "--predictions",
        choices=sorted(SPREAD_KEYS),
        default="head",
        help="head: the predictions the live cells ran on; true: a perfect predictor",
    )
    args = parser.parse_args(argv)
    result = json.loads(args.results.read_text())
    if not result.get("live"):
        parser.error(f"{args.results} has no live cells to replay")
    try:
        spread = add_to_result(result, args.replays, LIVE_CACHE_SIZE, args.predictions)
    except ValueError as exc:
        parser.error(f"{args.results}: {exc}")
    args.results.write_text(json.dumps(result, indent=1, default=float))
    args.results.with_name("results.md").write_text(markdown(result) + "\n")
    print(spread_tables(spread, result["live"]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
