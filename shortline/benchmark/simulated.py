"""The simulator beside the live runs: same requests, calibrated step times, then more.

Three uses: (1) each live cell again in the simulator, with the decode step
``a + b * batch`` measured on the live stack, to check that the simulator
predicts the live mean JCT; (2) what two cores cannot run live (64 and 256
workers, 100k requests, production lengths); (3) sensitivity of the gain to
predictor quality and to the semantic cache's hit rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.scheduler.core.batching import Batching
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.policies import PreemptionRule, make_policy
from services.scheduler.sim import runner as sim_runner
from services.scheduler.sim import workload as wl
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.service_model import ServiceModel
from shortline.benchmark.metrics import RequestTimes, add_ratios
from shortline.benchmark.workload import BenchWorkload


@dataclass(frozen=True)
class PolicyParams:
    """Aging and preemption settings, passed identically to the live scheduler and the simulator."""

    aging_rate: float  # key tokens per second waited
    max_wait_s: float
    preempt_factor: float = 4.0
    preempt_max_fraction: float = 0.25
    preempt_max_per_job: int = 1

    @staticmethod
    def scaled(worker_seconds_per_job: float, key_per_true_token: float) -> PolicyParams:
        """The simulator's defaults (20 key tokens per job time, bound 30 job times),
        in the units of the keys the scheduler sees."""
        return PolicyParams(
            aging_rate=20.0 * key_per_true_token / worker_seconds_per_job,
            max_wait_s=30.0 * worker_seconds_per_job,
        )

    def scheduler_flags(self) -> list[str]:
        return [
            "--aging-rate",
            f"{self.aging_rate:.6g}",
            "--max-wait-s",
            f"{self.max_wait_s:.6g}",
            "--preempt-factor",
            f"{self.preempt_factor:g}",
            "--preempt-max-fraction",
            f"{self.preempt_max_fraction:g}",
            "--preempt-max-per-job",
            str(self.preempt_max_per_job),
        ]


def sim_cell(
    work: BenchWorkload,
    policy: str,
    batching: Batching,
    *,
    workers: int,
    slots: int,
    model: ServiceModel,
    params: PolicyParams,
    cache_size: int,
) -> tuple[RequestTimes, int]:
    """One live cell in the simulator; (per-request times, preemptions)."""
    rule = PreemptionRule(
        params.preempt_factor, params.preempt_max_fraction, params.preempt_max_per_job
    )
    pol = make_policy(
        policy,
        aging_rate=params.aging_rate,
        max_wait_s=params.max_wait_s,
        preemption=rule,
        allow_oracle=True,
    )
    r = simulate(
        work.to_sim(),
        pol,
        batching,
        workers=workers,
        slots=slots,
        model=model,
        cache=SemanticCache(0.95, cache_size) if cache_size > 0 else None,
    )
    times = RequestTimes(
        arrival=r.arrival,
        first_token=r.first_token,
        finish=r.finish,
        tokens=r.tokens.astype(np.int64),
        wait=r.first_dispatch - r.arrival,
    )
    return times, r.preemptions


def at_scale(
    *,
    workers: int,
    requests: int,
    rho: float,
    batching: str,
    policies: str,
    trace: str,
    target_model: str,
    slots: int,
    model: ServiceModel,
    batch_wait_ms: float,
    seed: int,
    predictor: str = "real",
    repeat_share: float = 0.0,
    cache: bool = False,
    aging_rate: float = math.nan,
    max_wait_s: float = math.nan,
) -> list[dict[str, Any]]:
    """``shortline simulate`` at production lengths; rows with ratios and oracle share."""
    cfg = sim_runner.SimulateConfig(
        requests=requests,
        rho=rho,
        workers=workers,
        slots=slots,
        batching=batching,
        batch_wait_ms=batch_wait_ms,
        policies=policies,
        arrivals=trace,
        lengths="alpaca",
        target_model=target_model,
        split="test",
        predictor=predictor,
        step_a_ms=model.step_a_s * 1e3,
        step_b_ms=model.step_b_s * 1e3,
        repeat_share=repeat_share,
        cache=cache,
        seed=seed,
        aging_rate=aging_rate,
        max_wait_s=max_wait_s,
    )
    report = sim_runner.run(cfg)
    rows: list[dict[str, Any]] = report["rows"]
    caps = {c["batching"]: c["capacity_rps"] for c in report["cells"]}
    for row in rows:
        row.update(
            workers=workers,
            rho=rho,
            arrivals=trace,
            capacity_rps=caps.get(row["batching"], math.nan),
        )
    add_ratios(rows, ("batching", "workers", "rho"))
    return rows


def kendall_tau(predicted: np.ndarray, true: np.ndarray) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(predicted, true).statistic)


def noise_sensitivity(
    sigmas: list[float], *, modes: str, common: dict[str, Any]
) -> list[dict[str, Any]]:
    """Gain of ssjf over fcfs with predictions true * lognormal(sigma), and with the real head."""
    lengths = wl.alpaca_lengths(common["target_model"], "test")
    out: list[dict[str, Any]] = []
    specs = [("oracle" if s == 0 else f"noisy:{s:g}", s) for s in sigmas] + [("real", math.nan)]
    for spec, sigma in specs:
        # Same seed as the runner: the noise drawn here is the noise it simulates.
        pred, _ = wl.predictions_for(
            spec, lengths, common["target_model"], np.random.default_rng(common["seed"])
        )
        tau = kendall_tau(pred, lengths.true_tokens)
        rows = at_scale(batching=modes, policies="fcfs,ssjf,sjf-oracle", predictor=spec, **common)
        for row in rows:
            if row["policy"] == "ssjf":
                out.append(
                    {
                        "predictor": spec,
                        "sigma": sigma,
                        "kendall_tau": tau,
                        "batching": row["batching"],
                        "mean_jct_vs_fcfs": row["mean_jct_vs_fcfs"],
                        "oracle_share": row["oracle_share"],
                        "oracle_mean_jct_vs_fcfs": next(
                            r["mean_jct_vs_fcfs"]
                            for r in rows
                            if r["policy"] == "sjf-oracle" and r["batching"] == row["batching"]
                        ),
                    }
                )
    return out


def cache_sensitivity(
    shares: list[float], *, modes: str, common: dict[str, Any]
) -> list[dict[str, Any]]:
    """Gain of ssjf (real head + semantic cache) over fcfs as repeated prompts grow."""
    out: list[dict[str, Any]] = []
    for share in shares:
        rows = at_scale(
            batching=modes,
            policies="fcfs,ssjf,sjf-oracle",
            predictor="real",
            repeat_share=share,
            cache=True,
            **common,
        )
        for row in rows:
            if row["policy"] == "ssjf":
                out.append(
                    {
                        "repeat_share": share,
                        "batching": row["batching"],
                        "cache_hit_rate": row["cache_hit_rate"],
                        "mean_jct_vs_fcfs": row["mean_jct_vs_fcfs"],
                        "oracle_share": row["oracle_share"],
                    }
                )
    return out


def aging_sweep(
    rates: list[float],
    bounds: list[float],
    *,
    reference: list[dict[str, Any]],
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """ssjf-aging's two knobs against the target (p99 <= 1.10 x fcfs, >= 2/3 of ssjf's gain).

    ``rates`` are key tokens per job time at capacity and ``bounds`` the hard bound in
    job times, so one grid fits every mode; fcfs and ssjf come from ``reference``.
    """
    out: list[dict[str, Any]] = []
    for mode in dict.fromkeys(r["batching"] for r in reference):
        rows = [r for r in reference if r["batching"] == mode]
        fcfs = next(r for r in rows if r["policy"] == "fcfs")
        ssjf = next(r for r in rows if r["policy"] == "ssjf")
        per_job = common["workers"] / fcfs["capacity_rps"]
        gain = fcfs["mean_jct_s"] - ssjf["mean_jct_s"]
        for rate in rates:
            for bound in bounds:
                got = at_scale(
                    batching=mode,
                    policies="ssjf-aging",
                    aging_rate=rate / per_job,
                    max_wait_s=bound * per_job,
                    **common,
                )[0]
                p99 = got["p99_jct_s"] / fcfs["p99_jct_s"]
                kept = (fcfs["mean_jct_s"] - got["mean_jct_s"]) / gain if gain > 0 else math.nan
                out.append(
                    {
                        "batching": mode,
                        "rate_per_job_time": rate,
                        "bound_job_times": bound,
                        "mean_jct_vs_fcfs": got["mean_jct_s"] / fcfs["mean_jct_s"],
                        "p99_jct_vs_fcfs": p99,
                        "kept_of_ssjf_gain": kept,
                        "meets_target": bool(p99 <= 1.10 and kept >= 2 / 3),
                    }
                )
    return out
