"""``shortline simulate``: every policy and batching mode on one request sequence."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.core.bands import REFERENCE_BAND_MAX_WAIT_JOB_TIMES, BandSettings
from services.scheduler.core.batching import Batching
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.policies import (
    DEFAULTS,
    REFERENCE_SLACK_MARGIN,
    PolicySettings,
    PreemptionRule,
    make_policy,
)
from services.scheduler.sim import traffic
from services.scheduler.sim import workload as wl
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.report import add_ratios, group_table, groups, summarize, table
from services.scheduler.sim.service_model import ServiceModel, capacity, parse_dynamic_charge
from shortline.common import paths
from shortline.common.stats import kendall_tau

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulateConfig:
    requests: int = field(default=20_000, metadata={"help": "requests per cell"})
    rho: float = field(default=0.9, metadata={"help": "target load: arrival rate / capacity"})
    workers: int = field(default=1, metadata={"help": "workers"})
    slots: int = field(default=8, metadata={"help": "slots per worker (continuous K, dynamic B)"})
    batching: str = field(
        default="none,continuous", metadata={"help": "comma list of none, dynamic, continuous"}
    )
    batch_wait_ms: float = field(default=50.0, metadata={"help": "dynamic batching wait T"})
    policies: str = field(
        default="fcfs,ssjf,ssjf-aging,sjf-oracle",
        metadata={"help": "comma list; NAME or NAME+preempt (e.g. ssjf+preempt)"},
    )
    arrivals: str = field(default="poisson", metadata={"help": "poisson, conv or code (Azure)"})
    lengths: str = field(
        default="alpaca", metadata={"help": "alpaca (target model's responses) or trace (Azure)"}
    )
    trace: str = field(default="conv", metadata={"help": "Azure trace for --lengths trace"})
    target_model: str = field(
        default="Meta-Llama-3-8B-Instruct", metadata={"help": "alpaca_eval model for lengths"}
    )
    split: str = field(
        default="test",
        metadata={"help": "alpaca_eval prompts sampled: test (held out from the heads) or all"},
    )
    predictor: str = field(default="real", metadata={"help": "oracle, noisy:SIGMA or real[:HEAD]"})
    step_a_ms: float = field(default=20.0, metadata={"help": "decode step: a + b * batch (ms)"})
    step_b_ms: float = field(default=2.0, metadata={"help": "decode step: a + b * batch (ms)"})
    dynamic_charge: str = field(
        default="padded",
        metadata={
            "help": "dynamic batch steps charged for all B sequences until the longest ends "
            "(padded: a GPU without iteration-level scheduling) or for the running ones "
            "(running: the live replay engine)"
        },
    )
    prefill_us_per_token: float = field(
        default=0.0, metadata={"help": "prefill per prompt token (us); 0 = decode only"}
    )
    distribution: str = field(
        default="auto",
        metadata={
            "help": "length distributions for ssjf-risk/ssjf-gittins: auto (the predictor's "
            "quantiles, else a log-normal from held-out residuals), predictor, residuals, none"
        },
    )
    aging_rate: float = field(
        default=math.nan,
        metadata={"help": "ssjf-aging tokens per second waited (default 5 per job time)"},
    )
    jct_target_s: float = field(
        default=math.nan,
        metadata={
            "help": "ssjf-aging JCT target D, seconds (default 21 / 31 / 33 job times at "
            "capacity for none / dynamic / continuous; 0 = the older wait bound)"
        },
    )
    slack_margin: float = field(
        default=REFERENCE_SLACK_MARGIN,
        metadata={"help": "ssjf-aging: late this many next-pick services before latest start"},
    )
    max_wait_s: float = field(
        default=math.nan,
        metadata={"help": "ssjf-aging wait bound W when jct_target_s is 0 (default 26 job times)"},
    )
    preempt_factor: float = field(
        default=DEFAULTS.preempt_factor, metadata={"help": "preemption key factor"}
    )
    preempt_max_fraction: float = field(
        default=DEFAULTS.preempt_max_fraction,
        metadata={"help": "preempt only under this fraction of the prediction"},
    )
    preempt_max_per_job: int = field(
        default=DEFAULTS.preempt_max_per_job, metadata={"help": "preemptions per job"}
    )
    preempt_recompute_cost: float = field(
        default=math.nan,
        metadata={
            "help": "ssjf-risk/ssjf-gittins +preempt: decode tokens one recomputed token "
            "costs (default: K x prefill per token / step at K, the batch's stall)"
        },
    )
    repeat_share: float = field(
        default=0.0, metadata={"help": "share of requests repeating an earlier prompt"}
    )
    cache: bool = field(
        default=False, metadata={"help": "semantic cache of observed lengths (finds repeats)"}
    )
    cache_size: int = field(default=4096, metadata={"help": "semantic cache entries"})
    workload: str = field(
        default="",
        metadata={
            "help": "your own traffic: a JSONL or CSV file of requests (arrival_s, true_tokens, "
            "predicted_tokens or prompt; docs/benchmarks.md); replaces --lengths, --arrivals "
            "and --requests"
        },
    )
    from_log: str = field(
        default="",
        metadata={
            "help": "your own traffic: the scheduler's outcome log (SQLite); its finished "
            "requests are the workload"
        },
    )
    rescale_arrivals: bool = field(
        default=False,
        metadata={
            "help": "with --workload or --from-log: scale the arrival gaps to load --rho "
            "(default: the times as given)"
        },
    )
    band_max_wait_s: float = field(
        default=math.nan,
        metadata={
            "help": "priority bands: a lower band's wait bound, seconds (default "
            f"{REFERENCE_BAND_MAX_WAIT_JOB_TIMES:g} job times at capacity; 0: strict bands)"
        },
    )
    fair_share: bool = field(
        default=False,
        metadata={"help": "within a band, the tenant with the least recent service first"},
    )
    fair_share_half_life_s: float = field(
        default=math.nan,
        metadata={
            "help": "fair share: service halves every this many seconds (default 60 job times)"
        },
    )
    seed: int = field(default=1, metadata={"help": "random seed"})
    out: str = field(default="", metadata={"help": "JSON path (default .run/sim/...)"})


def _own_traffic(
    cfg: SimulateConfig, rng: np.random.Generator, predictor: wl.LengthPredictor | None
) -> wl.Workload | None:
    """The workload of ``--workload`` or ``--from-log`` (arrivals as given), or None."""
    if cfg.workload and cfg.from_log:
        raise traffic.TrafficError("--workload and --from-log are two sources: give one")
    if not cfg.workload and not cfg.from_log:
        if cfg.rescale_arrivals:
            raise traffic.TrafficError("--rescale-arrivals needs --workload or --from-log")
        return None
    need = cfg.predictor == "real" or cfg.predictor.startswith("real:")
    rows = (
        traffic.read_workload_file(cfg.workload, need_prediction=need)
        if cfg.workload
        else traffic.read_outcome_log(cfg.from_log, need_prediction=need)
    )
    return traffic.to_workload(
        rows,
        predictor_spec=cfg.predictor,
        target_model=cfg.target_model,
        rng=rng,
        predictor=predictor,
    )


def run(cfg: SimulateConfig, predictor: wl.LengthPredictor | None = None) -> dict[str, Any]:
    """Every policy x batching cell; ``predictor`` serves ``--predictor real`` (injected by
    the composition root, ``shortline.simulation``: the simulator imports no service)."""
    rng = np.random.default_rng(cfg.seed)
    own = _own_traffic(cfg, rng, predictor)
    if own is not None:
        lengths = wl.LengthSet([], own.prompt_tokens, own.true_tokens, str(own.info["source"]))
        predicted, source = own.predicted, own.prediction_source
    elif cfg.lengths == "alpaca":
        lengths = wl.alpaca_lengths(cfg.target_model, cfg.split)
    elif cfg.lengths == "trace":
        lengths = wl.trace_lengths(cfg.trace)
    else:
        raise ValueError(f"unknown --lengths {cfg.lengths!r}; use alpaca or trace")
    if own is None:
        predicted, source = wl.predictions_for(
            cfg.predictor, lengths, cfg.target_model, rng, predictor
        )
        quantiles, dist_source = wl.distributions_for(
            cfg.predictor,
            lengths,
            predicted,
            cfg.target_model,
            cfg.split,
            predictor,
            cfg.distribution,
        )
    else:
        quantiles, dist_source = None, "none (own traffic: a point only)"
    # Over the distinct requests the sequence samples from (own traffic: every request):
    # the predictor's quality here.
    tau = kendall_tau(predicted, lengths.true_tokens)
    model = ServiceModel(
        cfg.step_a_ms / 1e3,
        cfg.step_b_ms / 1e3,
        cfg.prefill_us_per_token / 1e6,
        dynamic_charge=parse_dynamic_charge(cfg.dynamic_charge),
    )
    rows: list[dict[str, Any]] = []
    group_rows: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for mode in [m.strip() for m in cfg.batching.split(",") if m.strip()]:
        batching = Batching.parse(mode, cfg.slots, cfg.batch_wait_ms / 1e3)
        cap = capacity(
            model, batching, cfg.workers, cfg.slots, lengths.true_tokens, lengths.prompt_tokens
        )
        rule = PreemptionRule(
            cfg.preempt_factor,
            cfg.preempt_max_fraction,
            cfg.preempt_max_per_job,
            recompute_cost(cfg, model, batching),
        )
        rate = cfg.rho * cap
        if own is None:
            work = wl.build(
                n=cfg.requests,
                rate=rate,
                arrivals=cfg.arrivals,
                lengths=lengths,
                predicted_unique=predicted,
                prediction_source=source,
                seed=cfg.seed,
                repeat_share=cfg.repeat_share,
                quantiles_unique=quantiles,
            )
        elif cfg.rescale_arrivals:
            work = traffic.rescaled(own, rate)
        else:
            work = own
            rate = traffic.offered_rate(own.arrivals)
        # Aging defaults scale with the time a worker spends per job at capacity; the
        # factors were tuned at rho 0.9 (alpaca Llama-3-8B, real head, one worker,
        # Poisson) to keep p99 JCT within 1.1x fcfs while keeping two thirds of ssjf's
        # mean gain.
        per_job = cfg.workers / cap
        ref = PolicySettings.reference(per_job, mode)
        aging_rate = cfg.aging_rate if not math.isnan(cfg.aging_rate) else ref.aging_rate
        max_wait = cfg.max_wait_s if not math.isnan(cfg.max_wait_s) else ref.max_wait_s
        jct_target = cfg.jct_target_s if not math.isnan(cfg.jct_target_s) else ref.jct_target_s
        bands = reference_bands(cfg, per_job)
        cells.append(
            {
                "batching": mode,
                "capacity_rps": cap,
                "rate_rps": rate,
                "offered_rho": rate / cap,
                "worker_seconds_per_job": per_job,
                "aging_rate": aging_rate,
                "max_wait_s": max_wait,
                "jct_target_s": jct_target,
            }
        )
        for spec in [p.strip() for p in cfg.policies.split(",") if p.strip()]:
            policy = make_policy(
                spec,
                aging_rate=aging_rate,
                max_wait_s=max_wait,
                jct_target_s=jct_target,
                slack_margin=cfg.slack_margin,
                preemption=rule,
                allow_oracle=True,
            )
            result = simulate(
                work,
                policy,
                batching,
                workers=cfg.workers,
                slots=cfg.slots,
                model=model,
                cache=SemanticCache(0.95, cfg.cache_size) if cfg.cache else None,
                bands=bands,
            )
            row = summarize(result)
            rows.append(row)
            group_rows += groups(result)
            log.info(
                "%s/%s: mean JCT %.3f s in %.1f s wall",
                mode,
                spec,
                row["mean_jct_s"],
                row["sim_wall_s"],
            )
    add_ratios(rows)
    return {
        "config": asdict(cfg),
        "traffic": None if own is None else own.info,
        "lengths": lengths.name,
        "prediction_source": source,
        "distribution_source": dist_source,
        "predictor_kendall_tau": tau,
        "capacity_definition": "workers / E[prefill + L*(a+b*K)/K] (see sim/service_model.py)",
        "dynamic_charge": model.dynamic_charge,
        "cells": cells,
        "rows": rows,
        "groups": group_rows,
    }


def recompute_cost(cfg: SimulateConfig, model: ServiceModel, batching: Batching) -> float:
    """Decode tokens one recomputed token costs: as given, else the prefill of one token
    over a decode step at the batch size, times the batch (the stall holds every job)."""
    if not math.isnan(cfg.preempt_recompute_cost):
        return cfg.preempt_recompute_cost
    k = batching.usable_slots(cfg.slots)
    return k * model.prefill_per_token_s / model.step(k)


def reference_bands(cfg: SimulateConfig, seconds_per_job: float) -> BandSettings:
    """The bands' settings for a load: as given, else in job times at capacity."""
    wait = cfg.band_max_wait_s
    half = cfg.fair_share_half_life_s
    return BandSettings(
        max_wait_s=wait
        if not math.isnan(wait)
        else REFERENCE_BAND_MAX_WAIT_JOB_TIMES * seconds_per_job,
        fair_share=cfg.fair_share,
        half_life_s=half if not math.isnan(half) else 60.0 * seconds_per_job,
    )


def main(cfg: SimulateConfig, predictor: wl.LengthPredictor | None = None) -> int:
    report = run(cfg, predictor)
    print(table(report["rows"]))
    if report["groups"]:
        print("\nper priority band and tenant:\n" + group_table(report["groups"]))
    own = report["traffic"]
    if own is not None:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(own["skipped"].items())) or "none"
        loads = ", ".join(f"{c['batching']} {c['offered_rho']:.2f}" for c in report["cells"])
        how = "rescaled to --rho" if cfg.rescale_arrivals else "as given"
        print(
            f"{own['source']}: {own['requests']} requests, arrival times {how} "
            f"(load vs capacity: {loads}); skipped: {skipped}"
        )
    print(
        f"lengths {report['lengths']}, predictor {cfg.predictor} "
        f"(Kendall tau {report['predictor_kendall_tau']:.3f} on the distinct requests)"
    )
    print(f"length distributions: {report['distribution_source']}")
    out = (
        Path(cfg.out) if cfg.out else paths.run_dir() / "sim" / f"simulate-{int(time.time())}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {out}")
    return 0
