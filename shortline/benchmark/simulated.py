"""The simulator beside the live runs: same requests, calibrated step times, then more.

Three uses: (1) each live cell again in the simulator, with the decode step
``a + b * batch`` measured on the live stack, to check that the simulator
predicts the live mean JCT; (2) what two cores cannot run live (64 and 256
workers, 100k requests, production lengths); (3) sensitivity of the gain to
predictor quality and to the semantic cache's hit rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.scheduler.core.batching import Batching
from services.scheduler.core.cache import SemanticCache
from services.scheduler.core.policies import REFERENCE_SLACK_MARGIN, PolicySettings
from services.scheduler.sim import runner as sim_runner
from services.scheduler.sim import workload as wl
from services.scheduler.sim.engine import RunResult, simulate
from services.scheduler.sim.report import summarize
from services.scheduler.sim.service_model import ServiceModel, capacity
from shortline.benchmark.summary import ORACLE_POLICY, RATIOS, RequestTimes
from shortline.benchmark.workload import BenchWorkload
from shortline.common.stats import add_ratios, kendall_tau
from shortline.simulation import real_predictor


@dataclass(frozen=True)
class PolicyParams(PolicySettings):
    """Aging and preemption settings, passed identically to the live scheduler (as flags)
    and to the simulator (as a policy)."""

    @staticmethod
    def scaled(
        worker_seconds_per_job: float, key_per_true_token: float, batching: str = "continuous"
    ) -> PolicyParams:
        """The reference-tuned settings (:meth:`PolicySettings.reference`: 5 key tokens
        per job time; JCT target 21, 31, 33 job times for none, dynamic, continuous), in
        the units of the keys the scheduler sees. The target is worth about fcfs's p99 JCT
        there; where fcfs's p99 is known, :meth:`with_fcfs_p99` sets it from that instead."""
        return PolicyParams.reference(worker_seconds_per_job, batching, key_per_true_token)

    def with_fcfs_p99(self, fcfs_p99_s: float, batching: str) -> PolicyParams:
        """JCT target from fcfs's p99 JCT on the same load (0.95 x none, 1.0 x dynamic,
        1.15 x continuous: fractions that met the target on four seeds of the reference)."""
        share = JCT_TARGET_OF_FCFS_P99.get(batching, 1.0)
        return dataclasses.replace(self, jct_target_s=share * fcfs_p99_s)

    def scheduler_flags(self) -> list[str]:
        return self.flags()


JCT_TARGET_OF_FCFS_P99 = {"none": 0.95, "dynamic": 1.0, "continuous": 1.15}


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
) -> tuple[RequestTimes, RunResult]:
    """One live cell in the simulator; (per-request times, the run's counters)."""
    r = simulate(
        work.to_sim(),
        params.policy(policy, allow_oracle=True),
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
    return times, r


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
    lengths: str = "alpaca",
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
        lengths=lengths,
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
    report = sim_runner.run(cfg, real_predictor())
    rows: list[dict[str, Any]] = report["rows"]
    caps = {c["batching"]: c["capacity_rps"] for c in report["cells"]}
    for row in rows:
        row.update(
            workers=workers,
            rho=rho,
            arrivals=trace,
            capacity_rps=caps.get(row["batching"], math.nan),
            predictor_kendall_tau=report["predictor_kendall_tau"],
        )
    add_ratios(rows, ("batching", "workers", "rho"), RATIOS, oracle=ORACLE_POLICY)
    return rows


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
            spec,
            lengths,
            common["target_model"],
            np.random.default_rng(common["seed"]),
            real_predictor(),
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


def noise_for_tau(lengths: wl.LengthSet, tau: float, seed: int) -> float:
    """The sigma of multiplicative log-normal noise whose predictions reach Kendall's
    ``tau`` on ``lengths``, drawn as the simulator draws them for ``seed``."""
    true = lengths.true_tokens.astype(np.float64)
    z = np.random.default_rng(seed).standard_normal(true.shape[0])
    lo, hi = 0.0, 5.0  # tau falls as sigma grows
    for _ in range(30):
        mid = (lo + hi) / 2
        if kendall_tau(true * np.exp(mid * z), true) > tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def azure_lengths(
    taus: list[float], *, batching: str, policies: str, common: dict[str, Any]
) -> list[dict[str, Any]]:
    """The Azure trace's own lengths (CV 0.77 against alpaca's 0.56), which come
    without prompts: predictions are the true length times log-normal noise
    calibrated to each Kendall's tau (the head's, and others), not a predictor."""
    lengths = wl.trace_lengths("conv")
    out: list[dict[str, Any]] = []
    for tau in taus:
        sigma = noise_for_tau(lengths, tau, common["seed"])
        rows = at_scale(
            batching=batching,
            policies=policies,
            lengths="trace",
            predictor=f"noisy:{sigma:.6f}",
            **common,
        )
        for row in rows:
            row.update(lengths="azure2023/conv", kendall_tau=tau, noise_sigma=sigma)
        out += rows
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


def _reference_cell(
    mode: str, params: PolicyParams, spec: str, common: dict[str, Any]
) -> dict[str, Any]:
    """One policy on the request sequence :func:`at_scale` builds for these settings.

    Built here rather than through ``shortline simulate`` so that every PolicyParams
    knob (the JCT target included) reaches the policy.
    """
    model: ServiceModel = common["model"]
    lengths = wl.alpaca_lengths(common["target_model"], "test")
    rng = np.random.default_rng(common["seed"])
    predicted, source = wl.predictions_for(
        common.get("predictor", "real"), lengths, common["target_model"], rng, real_predictor()
    )
    # As the runner builds it: the step only (its prefill default is 0).
    sim_model = ServiceModel(model.step_a_s, model.step_b_s)
    batching = Batching.parse(mode, common["slots"], common["batch_wait_ms"] / 1e3)
    workers = common["workers"]
    cap = capacity(
        sim_model, batching, workers, common["slots"], lengths.true_tokens, lengths.prompt_tokens
    )
    work = wl.build(
        n=common["requests"],
        rate=common["rho"] * cap,
        arrivals=common["trace"],
        lengths=lengths,
        predicted_unique=predicted,
        prediction_source=source,
        seed=common["seed"],
    )
    r = simulate(
        work,
        params.policy(spec, allow_oracle=True),
        batching,
        workers=workers,
        slots=common["slots"],
        model=sim_model,
    )
    return summarize(r)


def aging_sweep(
    rates: list[float],
    bounds: list[float],
    *,
    reference: list[dict[str, Any]],
    common: dict[str, Any],
    margin: float = REFERENCE_SLACK_MARGIN,
) -> list[dict[str, Any]]:
    """ssjf-aging's two knobs against the target (p99 <= 1.10 x fcfs, >= 2/3 of ssjf's gain).

    ``rates`` are key tokens per job time at capacity and ``bounds`` the JCT target D
    in job times (the latest-start guard), so one grid fits every mode; fcfs and ssjf
    come from ``reference``, each row also gives D as a multiple of fcfs's p99 JCT.
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
                params = dataclasses.replace(
                    PolicyParams.reference(per_job, mode),
                    aging_rate=rate / per_job,
                    jct_target_s=bound * per_job,
                    slack_margin=margin,
                )
                got = _reference_cell(mode, params, "ssjf-aging", common)
                p99 = got["p99_jct_s"] / fcfs["p99_jct_s"]
                kept = (fcfs["mean_jct_s"] - got["mean_jct_s"]) / gain if gain > 0 else math.nan
                out.append(
                    {
                        "batching": mode,
                        "rate_per_job_time": rate,
                        "bound_job_times": bound,
                        "jct_target_vs_fcfs_p99": bound * per_job / fcfs["p99_jct_s"],
                        "slack_margin": margin,
                        "mean_jct_vs_fcfs": got["mean_jct_s"] / fcfs["mean_jct_s"],
                        "p99_jct_vs_fcfs": p99,
                        "kept_of_ssjf_gain": kept,
                        "meets_target": bool(p99 <= 1.10 and kept >= 2 / 3),
                    }
                )
    return out
