"""The scheduler service's configuration (flags and SHORTLINE_SCHEDULER_* variables).

The policy fields take their defaults from ``core.policies`` (``DEFAULT_POLICY`` and
``PolicySettings``), the one source of policy defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.core.band_guard import GuardSettings
from services.scheduler.core.bands import (
    DEFAULT_BAND_MAX_WAIT_S,
    DEFAULT_FAIR_SHARE_HALF_LIFE_S,
    BandSettings,
)
from services.scheduler.core.policies import DEFAULT_POLICY, DEFAULTS, Policy, PolicySettings
from shortline.common.tls import TlsSettings


@dataclass(frozen=True)
class SchedulerConfig(TlsSettings):
    port: int = field(default=50051, metadata={"help": "public (client) gRPC port"})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "public listen address (and metrics'); 0.0.0.0 needs --tokens-file"},
    )
    internal_port: int = field(
        default=50052,
        metadata={
            "help": "internal gRPC port: worker registration, heartbeats, operator stats "
            "(0 picks a free one)"
        },
    )
    internal_host: str = field(
        default="127.0.0.1",
        metadata={"help": "internal listen address (give workers' network; use --tls-ca there)"},
    )
    tokens_file: str = field(
        default="",
        metadata={
            "help": "TOML file of bearer tokens -> tenants (and allowed models), re-read on "
            "change; empty: no authentication, loopback only"
        },
    )
    worker_identities: str = field(
        default="",
        metadata={
            "help": "with mutual TLS: comma-separated certificate names allowed to register "
            "as workers (empty: any name from the CA except the scheduler's and predictor's)"
        },
    )
    max_prompt_bytes: int = field(
        default=262144,
        metadata={"help": "largest prompt accepted (UTF-8 bytes); messages above ~4x are cut off"},
    )
    predictor: str = field(
        default="", metadata={"help": "predictor HOST:PORT (empty: fallback predictions only)"}
    )
    predictor_timeout_ms: float = field(
        default=200.0, metadata={"help": "deadline of a Predict call before falling back"}
    )
    # Head versions (issue 18, predictor rollout): the canary's share of predictions.
    predictor_canary_share: float = field(
        default=0.1,
        metadata={
            "help": "share of requests (by a hash of the request id, so a retry gets the "
            "same version) predicted by a target's canary head version, when the predictor's "
            "ListModels names one; 0: never. Online accuracy (shortline stats) compares the two"
        },
    )
    predictor_versions_refresh_s: float = field(
        default=30.0,
        metadata={
            "help": "how often the predictor's ListModels is asked again (its targets and "
            "each one's serving and canary versions)"
        },
    )
    policy: str = field(
        default=DEFAULT_POLICY,
        metadata={
            "help": "fcfs, ssjf, ssjf-aging, ssjf-risk, ssjf-gittins (add +preempt to "
            "preempt); sjf-oracle in benchmark mode"
        },
    )
    aging_rate: float = field(
        default=DEFAULTS.aging_rate,
        metadata={"help": "ssjf-aging: key tokens taken off per second waited"},
    )
    jct_target_s: float = field(
        default=DEFAULTS.jct_target_s,
        metadata={
            "help": "ssjf-aging: JCT target D (s); a job goes first once it could no longer "
            "finish by arrival + D (predicted service included); set it near fcfs's p99 JCT; "
            "0: use the --max-wait-s bound instead"
        },
    )
    token_time_s: float = field(
        default=DEFAULTS.token_time_s,
        metadata={
            "help": "ssjf-aging: seconds a job takes per predicted token on a worker, for "
            "latest starts (0: learned from finished runs)"
        },
    )
    slack_margin: float = field(
        default=DEFAULTS.slack_margin,
        metadata={
            "help": "ssjf-aging: a job is also late when its latest start passes within this "
            "many services of the next shortest job"
        },
    )
    max_wait_s: float = field(
        default=DEFAULTS.max_wait_s,
        metadata={"help": "ssjf-aging with --jct-target-s 0: hard bound W on waiting (s)"},
    )
    preempt_factor: float = field(
        default=DEFAULTS.preempt_factor,
        metadata={
            "help": "preempt when a queued job's remaining prediction x this < a running one's"
        },
    )
    preempt_max_fraction: float = field(
        default=DEFAULTS.preempt_max_fraction,
        metadata={"help": "preempt only a job under this fraction of its prediction (recompute)"},
    )
    preempt_max_per_job: int = field(
        default=DEFAULTS.preempt_max_per_job, metadata={"help": "preemptions per job"}
    )
    # Length distributions (issue 19): distribution-aware preemption's recompute cost.
    preempt_recompute_cost: float = field(
        default=DEFAULTS.preempt_recompute_cost,
        metadata={
            "help": "ssjf-risk/ssjf-gittins +preempt: decode tokens that recomputing one "
            "prompt or generated token costs (prefill time per token / decode step x batch)"
        },
    )
    batching: str = field(default="continuous", metadata={"help": "none, dynamic, continuous"})
    slots: int = field(default=8, metadata={"help": "cap on slots used per worker (B, K)"})
    batch_wait_ms: float = field(default=50.0, metadata={"help": "dynamic batching wait T"})
    queue_limit: int = field(
        default=1000,
        metadata={"help": "waiting requests before RESOURCE_EXHAUSTED (with a retry hint)"},
    )
    tenant_queue_share: float = field(
        default=0.5,
        metadata={
            "help": "fraction of --queue-limit one tenant's waiting requests may take, so no "
            "tenant fills the queue (1: no cap; the one anonymous tenant without "
            "--tokens-file is never capped)"
        },
    )
    deadline_shed_margin: float = field(
        default=0.2,
        metadata={
            "help": "refuse a request (DEADLINE_EXCEEDED, before Accepted) when the work "
            "ahead plus its predicted service exceeds its deadline by more than this "
            "fraction (negative: refuse earlier)"
        },
    )
    # ---- priority bands and fair share (issue 19; core/bands.py) ----
    band_max_wait_s: float = field(
        default=DEFAULT_BAND_MAX_WAIT_S,
        metadata={
            "help": "priority bands: a queued job of a lower band that has waited this long "
            "goes next, before every band (0: strict bands, a lower band may starve)"
        },
    )
    # On: in bench.priority (ssjf, rho 0.9, a tenant with 10% of the load beside one
    # with 90%) it costs the mean JCT 1.5% (none) and 0.3% (continuous) and cuts the
    # small tenant's p99 from 885 to 40 s and 108 to 38 s; under a flood (rho 1.1) from
    # 73,000 to 41 s. One tenant (no tokens file) is served exactly as without it.
    fair_share: bool = field(
        default=True,
        metadata={
            "help": "within a band, serve first the tenant with the least recent service "
            "(predicted tokens dispatched, decaying), then the policy's order"
        },
    )
    fair_share_half_life_s: float = field(
        default=DEFAULT_FAIR_SHARE_HALF_LIFE_S,
        metadata={"help": "fair share: a tenant's past service halves every this many seconds"},
    )
    # ---- band guard (issue 19, band guard helper; core/band_guard.py) ----
    # All off by default, from bench.priority (rho 0.9, 20% of the load in a high band):
    # preemption takes the high band's p99 from 1.20x to 1.00x its p99 alone without
    # batching and from 1.55x to 1.43x in continuous batching (short of 1.2x) for +3% /
    # +1% on the low band's mean JCT, but the simulator recomputes for free and ~11% of
    # the requests are stopped once, so its live cost is unmeasured, and a running job
    # is otherwise never stopped for a band unless the policy preempts (ssjf+preempt
    # already does across bands). A reservation of 1-2 slots does not lower the high
    # band's p99 (it is slow steps, not waits), and a cap that does (4-5 slots, stopping
    # lower-band jobs above it: 1.14-1.25x) costs more throughput than rho 0.9 leaves:
    # the low band's mean JCT goes from 22 s to 540+ s.
    band_preempt: bool = field(
        default=False,
        metadata={
            "help": "priority bands: a queued job that finds no slot stops the running job "
            "of a lower band with the most remaining work (recompute counted), at most "
            "preempt_max_per_job times per job"
        },
    )
    band_reserve_slots: int = field(
        default=0,
        metadata={
            "help": "priority bands: while a higher band is active, lower bands fill at most "
            "slots minus this many of a worker (0: off)"
        },
    )
    band_reserve_window_s: float = field(
        default=10.0,
        metadata={"help": "band reservation: a band stays active this long after a job queued"},
    )
    band_cap_slots: int = field(
        default=0,
        metadata={
            "help": "priority bands: while a worker runs a higher band's job, lower-band jobs "
            "start there only while it runs fewer jobs than this (0: off)"
        },
    )
    band_cap_shrink: bool = field(
        default=False,
        metadata={"help": "band cap: also stop lower-band jobs above the cap"},
    )
    outcome_log: str = field(
        default="", metadata={"help": "SQLite outcome log path (default .run/outcomes.sqlite)"}
    )
    outcome_log_prompts: str = field(
        default="text",
        metadata={
            "help": "what the outcome log keeps of a prompt: text, or digest (SHA-256 and the "
            "predictor's embedding; retraining then uses the embeddings)"
        },
    )
    outcome_log_max_rows: int = field(
        default=200_000, metadata={"help": "outcome log retention: newest rows kept (0: all)"}
    )
    outcome_log_max_age_days: float = field(
        default=30.0, metadata={"help": "outcome log retention: rows older are deleted (0: keep)"}
    )
    journal: str = field(
        default="",
        metadata={
            "help": "admission journal (SQLite): requests survive a crash and continue on "
            "restart; empty: scheduler-PORT.journal.sqlite in $SHORTLINE_JOURNAL_DIR or .run; "
            "'off': none"
        },
    )
    restart_reattach_s: float = field(
        default=15.0,
        metadata={
            "help": "after a restart, how long a reloaded unfinished request waits for a "
            "client to reattach before it is cancelled (at least its own reattach grace)"
        },
    )
    benchmark_mode: bool = field(
        default=False,
        metadata={
            "help": "replay benchmarks: max_tokens is the true length, so sjf-oracle may "
            "use it and predictions are not capped at it"
        },
    )
    prediction_scale: float = field(
        default=1.0,
        metadata={
            "help": "benchmark mode only: the predictor's tokens are divided by this, for "
            "replayed lengths that were divided by it (keeps predictions and generated "
            "tokens in one unit, which preemption and aging compare)"
        },
    )
    default_length_model: str = field(
        default="Meta-Llama-3-8B-Instruct",
        metadata={"help": "length model when a request names none"},
    )
    heartbeat_interval_s: float = field(
        default=1.0, metadata={"help": "heartbeat period asked of workers"}
    )
    drain_grace_s: float = field(
        default=20.0,
        metadata={
            "help": "on SIGTERM: how long running and queued requests may take to finish "
            "while no new one is admitted (UNAVAILABLE); the rest then end UNAVAILABLE"
        },
    )
    cache_threshold: float = field(default=0.95, metadata={"help": "semantic cache cosine"})
    cache_size: int = field(default=4096, metadata={"help": "semantic cache entries per model"})
    max_reattach_grace_s: float = field(
        default=30.0,
        metadata={
            "help": "cap on a request's reattach_grace_seconds: how long it outlives its "
            "last client stream for a retry to reattach (unset in the request: cancelled "
            "at once)"
        },
    )
    result_ttl_s: float = field(
        default=600.0, metadata={"help": "keep finished results this long for retried ids"}
    )
    metrics_port: int = field(default=0, metadata={"help": "Prometheus port (0: off)"})
    fallback_tokens: float = field(
        default=256.0, metadata={"help": "fallback prediction before any observation"}
    )

    @property
    def max_message_bytes(self) -> int:
        """Largest gRPC message the public port reads: a prompt up to 4x the limit still
        gets INVALID_ARGUMENT naming the limit; above that gRPC refuses it unread."""
        return max(4 * self.max_prompt_bytes + 65536, 1 << 20)

    @property
    def max_concurrent_streams(self) -> int:
        """HTTP/2 streams per client connection on the public port: room for a full
        queue plus as many running and reattached streams, so that admission (a
        RESOURCE_EXHAUSTED with a retry hint), not the transport, refuses first."""
        return 2 * self.queue_limit + 1024


def build_policy(cfg: SchedulerConfig) -> Policy:
    """The policy these flags describe (raises PolicyError for a bad one)."""
    return PolicySettings.of(cfg).policy(cfg.policy, allow_oracle=cfg.benchmark_mode)


def build_bands(cfg: SchedulerConfig) -> BandSettings:
    """Priority bands and fair share as these flags describe them (ValueError if bad)."""
    guard = GuardSettings(
        cfg.band_preempt,
        cfg.band_reserve_slots,
        cfg.band_reserve_window_s,
        cfg.band_cap_slots,
        cfg.band_cap_shrink,
    )
    return BandSettings(cfg.band_max_wait_s, cfg.fair_share, cfg.fair_share_half_life_s, guard)
