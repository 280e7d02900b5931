"""What a benchmark cell reports, computed the same way for live and simulated runs.

(Not Prometheus metrics: the per-cell summary row of the results. The shared
statistics, completion summaries and ratios to fcfs, are in
:mod:`shortline.common.stats`.)

Every function takes per-request arrays in seconds (NaN for a request that
never finished) so that a live run (client-side clocks) and a simulation
(virtual clock) are summarised by one code path.

Goodput counts the jobs that meet a latency SLO per second of the run. The
SLO is relative to the job's own size: a job meets it when its completion
time is at most ``slo_factor`` times its isolated service time, ``tokens *
(a + b)`` (the time it takes alone on an idle worker). A fixed number of
seconds would be unfair to long answers, which nobody expects instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shortline.common.stats import completion_stats

PAPER_FRACTION = 0.25
ORACLE_POLICY = "sjf-oracle"

Array = NDArray[np.float64]


@dataclass(frozen=True)
class RequestTimes:
    """Per request: when it arrived, got its first token, finished; how long it was."""

    arrival: Array
    first_token: Array
    finish: Array
    tokens: NDArray[np.int64]
    # Time from arrival to the first dispatch to a worker (the scheduler's queue wait).
    wait: Array
    preemptions: NDArray[np.int64] | None = None


def paper_throughput(arrival: Array, finish: Array, fraction: float = PAPER_FRACTION) -> float:
    """Jobs per second by the time ``fraction`` of all jobs have completed (Qiu et al.).

    The clock starts at the first arrival. It flatters SJF: finishing short jobs
    first makes the first quarter of completions arrive sooner while the total
    work, and so the sustainable throughput, is unchanged.
    """
    done = np.sort(finish[~np.isnan(finish)])
    n = arrival.shape[0]
    k = int(np.ceil(fraction * n))
    if k == 0 or done.shape[0] < k:
        return float("nan")
    elapsed = float(done[k - 1] - np.min(arrival))
    return k / elapsed if elapsed > 0 else float("nan")


def goodput(
    jct: Array, tokens: NDArray[np.int64], step_one_s: float, slo_factor: float, span_s: float
) -> tuple[float, float]:
    """(jobs meeting the SLO per second, share of jobs meeting it); see the module doc."""
    ok = jct <= slo_factor * tokens.astype(np.float64) * step_one_s
    met = int(np.count_nonzero(ok))
    return (met / span_s if span_s > 0 else float("nan"), met / jct.shape[0] if jct.size else 0.0)


def summarize(t: RequestTimes, *, step_one_s: float, slo_factor: float) -> dict[str, Any]:
    """Mean/p50/p99 JCT, TTFT and wait; throughput and goodput over all jobs; paper metric."""
    row: dict[str, Any] = completion_stats(t.arrival, t.wait, t.first_token, t.finish, t.tokens)
    done = ~np.isnan(t.finish)
    span = float(np.max(t.finish[done]) - np.min(t.arrival)) if done.any() else float("nan")
    good_rps, good_share = goodput(
        (t.finish - t.arrival)[done], t.tokens[done], step_one_s, slo_factor, span
    )
    row.update(
        unfinished=int((~done).sum()),
        goodput_rps=good_rps,
        slo_met=good_share,
        paper_throughput_rps=paper_throughput(t.arrival, t.finish),
    )
    if t.preemptions is not None:
        row["preemptions"] = int(t.preemptions[done].sum())
    return row


RATIO_KEYS = (
    "mean_jct_s",
    "p50_jct_s",
    "p99_jct_s",
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_wait_s",
    "p99_wait_s",
    "throughput_rps",
    "throughput_tps",
    "goodput_rps",
    "paper_throughput_rps",
)


# ``<key>_vs_fcfs`` for each: the ratios every benchmark row gets
# (``shortline.common.stats.add_ratios(rows, group, RATIOS, oracle=ORACLE_POLICY)``).
RATIOS = {k: f"{k.removesuffix('_s')}_vs_fcfs" for k in RATIO_KEYS}
