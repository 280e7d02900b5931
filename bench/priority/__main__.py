"""Priority bands and fair share in the simulator (issue 19's priority target).

Target: with 20% of the load in a high band (rho 0.9, alpaca_eval Llama-3-8B
test lengths, the real head, one worker, 8 slots, no batching and continuous),
the high band's p99 JCT stays within 1.2x of its p99 when it runs alone, and
the low band keeps >= 2/3 of ssjf's mean-JCT gain over fcfs: low-band jobs'
mean JCT, fcfs -> ssjf, both with the bands, over fcfs -> ssjf without bands
(also reported: against the unbanded fcfs, which charges the low band for the
precedence it gives the high one).

The band guard (``core/band_guard.py``) is measured beside plain strict bands,
one row per candidate: band preemption (a queued higher-band job that finds no
slot stops the lower-band job with the most remaining work), a slot reservation
for the higher band, and a batch cap while a higher band runs (with and without
stopping lower-band jobs above it). A guard row's low-band gain is counted
against fcfs with the same bands and *no* guard: a guard that slows the whole
system also slows banded fcfs, and counting against that would call a low band
that waits 50x longer one that "kept" its gain.

Also measured: the lower band's wait bound (``band_max_wait_s``, in job times
at capacity) from strict bands to a short bound, and fair share between two
tenants (one sending 90% of the load, one 10%; then the flood: one at rho
1.0, one at 0.1) with it off and on.

    .venv/bin/python -m bench.priority [--requests 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.core.band_guard import GuardSettings
from services.scheduler.core.bands import REFERENCE_BAND_MAX_WAIT_JOB_TIMES, BandSettings
from services.scheduler.core.batching import Batching
from services.scheduler.core.policies import make_policy
from services.scheduler.sim.engine import RunResult, simulate
from services.scheduler.sim.service_model import ServiceModel, capacity
from services.scheduler.sim.workload import Workload, alpaca_lengths, build, predictions_for
from shortline.common.stats import percentile
from shortline.simulation import real_predictor

RESULTS = Path(__file__).resolve().parent.parent / "results"
MODEL = ServiceModel(step_a_s=0.020, step_b_s=0.002)
TARGET_MODEL = "Meta-Llama-3-8B-Instruct"
SLOTS = 8
HIGH_SHARE = 0.2
WAITS_JOB_TIMES = (0.0, 20.0, 60.0, REFERENCE_BAND_MAX_WAIT_JOB_TIMES)
MODES = ("none", "dynamic", "continuous")
# Band guard candidates (strict bands), name -> settings; the reservation window is in
# job times at capacity. Only preemption applies without batching (one slot), none in
# dynamic batching (a batch runs to its end).
GUARDS: dict[str, dict[str, Any]] = {
    "preempt": {"preempt": True},
    "reserve 1": {"reserve_slots": 1, "reserve_window_s": 10.0},
    "reserve 2": {"reserve_slots": 2, "reserve_window_s": 10.0},
    "cap 6": {"cap_slots": 6},
    "cap 4": {"cap_slots": 4},
    "cap 6 shrink": {"cap_slots": 6, "cap_shrink": True},
    "cap 5 shrink": {"cap_slots": 5, "cap_shrink": True},
    "cap 4 shrink": {"cap_slots": 4, "cap_shrink": True},
    "preempt + cap 5 shrink": {"preempt": True, "cap_slots": 5, "cap_shrink": True},
    "preempt + cap 4 shrink": {"preempt": True, "cap_slots": 4, "cap_shrink": True},
}
GUARDS_BY_MODE = {"none": ("preempt",), "dynamic": (), "continuous": tuple(GUARDS)}


def _guard(name: str, per_job: float) -> GuardSettings:
    spec = dict(GUARDS[name])
    if "reserve_window_s" in spec:
        spec["reserve_window_s"] *= per_job
    return GuardSettings(**spec)


def _jct(r: RunResult, mask: np.ndarray) -> tuple[float, float]:
    jct = (r.finish - r.arrival)[mask]
    jct = jct[np.isfinite(jct)]
    return float(jct.mean()), percentile(jct, 99)


def _sub(work: Workload, mask: np.ndarray) -> Workload:
    return replace(
        work,
        arrivals=work.arrivals[mask],
        prompt_tokens=work.prompt_tokens[mask],
        true_tokens=work.true_tokens[mask],
        predicted=work.predicted[mask],
        priority=None,
        tenant=None,
    )


def _run(
    work: Workload, spec: str, batching: Batching, bands: BandSettings | None = None
) -> RunResult:
    policy = make_policy(spec, allow_oracle=True)
    return simulate(work, policy, batching, workers=1, slots=SLOTS, model=MODEL, bands=bands)


def priority_cell(
    mode: str, n: int, seed: int, lengths: Any, predicted: np.ndarray
) -> dict[str, Any]:
    batching = Batching.parse(mode, SLOTS, 0.05)
    cap = capacity(MODEL, batching, 1, SLOTS, lengths.true_tokens, lengths.prompt_tokens)
    per_job = 1.0 / cap
    work = build(
        n=n,
        rate=0.9 * cap,
        arrivals="poisson",
        lengths=lengths,
        predicted_unique=predicted,
        prediction_source="predictor",
        seed=seed,
    )
    high = np.random.default_rng(seed + 7).random(n) < HIGH_SHARE
    banded = replace(work, priority=high.astype(np.int64))
    low = ~high
    alone = _run(_sub(work, high), "ssjf", batching)
    high_alone_p99 = _jct(alone, np.ones(int(high.sum()), dtype=bool))[1]
    fcfs_low = _jct(_run(work, "fcfs", batching), low)[0]
    ssjf_low = _jct(_run(work, "ssjf", batching), low)[0]
    rows = []
    cases = [(p, w, "") for p in ("ssjf", "ssjf+preempt") for w in WAITS_JOB_TIMES]
    cases += [(p, 0.0, g) for p in ("ssjf", "ssjf+preempt") for g in GUARDS_BY_MODE[mode]]
    if "preempt" in GUARDS_BY_MODE[mode]:  # the service's defaults: the bound and preemption
        cases += [
            (p, REFERENCE_BAND_MAX_WAIT_JOB_TIMES, "preempt") for p in ("ssjf", "ssjf+preempt")
        ]
    plain_fcfs: dict[float, float] = {}
    for spec, wait, guard in cases:
        bands = BandSettings(max_wait_s=wait * per_job)
        if wait not in plain_fcfs:
            plain_fcfs[wait] = _jct(_run(banded, "fcfs", batching, bands), low)[0]
        if guard:
            bands = replace(bands, guard=_guard(guard, per_job))
        r = _run(banded, spec, batching, bands)
        hi_mean, hi_p99 = _jct(r, high)
        lo_mean, lo_p99 = _jct(r, low)
        kept = (fcfs_low - lo_mean) / (fcfs_low - ssjf_low)
        fcfs_banded_low = (
            _jct(_run(banded, "fcfs", batching, bands), low)[0] if guard else plain_fcfs[wait]
        )
        kept_in_bands = (plain_fcfs[wait] - lo_mean) / (fcfs_low - ssjf_low)
        rows.append(
            {
                "policy": spec,
                "band_max_wait_job_times": wait,
                "guard": guard,
                "preemptions": r.preemptions,
                "high_mean_s": hi_mean,
                "high_p99_s": hi_p99,
                "high_p99_vs_alone": hi_p99 / high_alone_p99,
                "low_mean_s": lo_mean,
                "low_p99_s": lo_p99,
                "low_gain_kept": kept,
                "low_mean_fcfs_banded_s": fcfs_banded_low,
                "low_gain_kept_in_bands": kept_in_bands,
                # fcfs with the same bands and guard (not the target's reading: a guard
                # that costs throughput slows this baseline too, and "gains" with it).
                "low_gain_kept_same_guard": (fcfs_banded_low - lo_mean) / (fcfs_low - ssjf_low),
                # The target's "ssjf's gain" read within the banded system (fcfs with the
                # same bands and no guard -> this row, over ssjf's gain without bands); the
                # other reading (``low_gain_kept``) charges the low band for the
                # precedence it gives, which no order within a band can win back.
                "meets": hi_p99 / high_alone_p99 <= 1.2 and kept_in_bands >= 2 / 3,
            }
        )
    return {
        "batching": mode,
        "seconds_per_job": per_job,
        "high_alone_p99_s": high_alone_p99,
        "low_mean_fcfs_s": fcfs_low,
        "low_mean_ssjf_s": ssjf_low,
        "rows": rows,
    }


def fair_cell(mode: str, n: int, seed: int, lengths: Any, predicted: np.ndarray) -> dict[str, Any]:
    batching = Batching.parse(mode, SLOTS, 0.05)
    cap = capacity(MODEL, batching, 1, SLOTS, lengths.true_tokens, lengths.prompt_tokens)
    per_job = 1.0 / cap
    out: dict[str, Any] = {"batching": mode, "cases": []}
    for case, rho, light_share in (("steady", 0.9, 0.1), ("flood", 1.1, 0.1 / 1.1)):
        work = build(
            n=n,
            rate=rho * cap,
            arrivals="poisson",
            lengths=lengths,
            predicted_unique=predicted,
            prediction_source="predictor",
            seed=seed,
        )
        light = np.random.default_rng(seed + 11).random(n) < light_share
        tenants = ["light" if x else "heavy" for x in light]
        work = replace(work, tenant=tenants)
        for fair in (False, True):
            bands = BandSettings(fair_share=fair, half_life_s=60.0 * per_job)
            r = _run(work, "ssjf", batching, bands)
            every = np.ones(n, dtype=bool)
            out["cases"].append(
                {
                    "case": case,
                    "rho": rho,
                    "fair_share": fair,
                    "all_mean_s": _jct(r, every)[0],
                    "light_mean_s": _jct(r, light)[0],
                    "light_p99_s": _jct(r, light)[1],
                    "heavy_mean_s": _jct(r, ~light)[0],
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    lengths = alpaca_lengths(TARGET_MODEL, "test")
    predicted, _ = predictions_for(
        "real", lengths, TARGET_MODEL, np.random.default_rng(args.seed), real_predictor()
    )
    cells = [priority_cell(m, args.requests, args.seed, lengths, predicted) for m in MODES]
    fair = [
        fair_cell(m, args.requests, args.seed, lengths, predicted) for m in ("none", "continuous")
    ]
    print(
        f"priority bands, ssjf, rho 0.9, {HIGH_SHARE:.0%} of the load in the high band, "
        f"{args.requests} requests (target: high p99 <= 1.2x alone, low keeps >= 2/3 of gain)\n"
    )
    print(
        "| batching | policy | wait bound (job times) | guard | high p99 / alone "
        "| low gain kept | kept vs fcfs in bands | low mean s | low p99 s | preemptions | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        for r in c["rows"]:
            wait = r["band_max_wait_job_times"] or "strict"
            print(
                f"| {c['batching']} | {r['policy']} | {wait} | {r['guard'] or '-'} "
                f"| {r['high_p99_vs_alone']:.3f} | {r['low_gain_kept']:.0%} "
                f"| {r['low_gain_kept_in_bands']:.0%} | {r['low_mean_s']:.2f} "
                f"| {r['low_p99_s']:.2f} | {r['preemptions']} | {r['meets']} |"
            )
    print("\nfair share between two tenants (heavy 90% of the load, light 10%), ssjf\n")
    print(
        "| batching | case | fair share | all mean s | light mean s | light p99 s | heavy mean s |"
    )
    print("|---|---|---|---|---|---|---|")
    for f in fair:
        for r in f["cases"]:
            print(
                f"| {f['batching']} | {r['case']} (rho {r['rho']}) | {r['fair_share']} "
                f"| {r['all_mean_s']:.2f} | {r['light_mean_s']:.2f} | {r['light_p99_s']:.2f} "
                f"| {r['heavy_mean_s']:.2f} |"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "priority.json"
    report = {
        "requests": args.requests,
        "seed": args.seed,
        "priority": cells,
        "fair_share": fair,
        "wall_s": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
