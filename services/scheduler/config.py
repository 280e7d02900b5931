"""The scheduler service's configuration (flags and SHORTLINE_SCHEDULER_* variables).

The policy fields take their defaults from ``core.policies`` (``DEFAULT_POLICY`` and
``PolicySettings``), the one source of policy defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.core.policies import DEFAULT_POLICY, DEFAULTS, Policy, PolicySettings


@dataclass(frozen=True)
class SchedulerConfig:
    port: int = field(default=50051, metadata={"help": "gRPC listen port"})
    host: str = field(default="0.0.0.0", metadata={"help": "listen address"})
    predictor: str = field(
        default="", metadata={"help": "predictor HOST:PORT (empty: fallback predictions only)"}
    )
    predictor_timeout_ms: float = field(
        default=200.0, metadata={"help": "deadline of a Predict call before falling back"}
    )
    policy: str = field(
        default=DEFAULT_POLICY,
        metadata={
            "help": "fcfs, ssjf, ssjf-aging (add +preempt to preempt); sjf-oracle in benchmark mode"
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
    batching: str = field(default="continuous", metadata={"help": "none, dynamic, continuous"})
    slots: int = field(default=8, metadata={"help": "cap on slots used per worker (B, K)"})
    batch_wait_ms: float = field(default=50.0, metadata={"help": "dynamic batching wait T"})
    queue_limit: int = field(default=1000, metadata={"help": "waiting requests before refusal"})
    outcome_log: str = field(
        default="", metadata={"help": "SQLite outcome log path (default .run/outcomes.sqlite)"}
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
    cache_threshold: float = field(default=0.95, metadata={"help": "semantic cache cosine"})
    cache_size: int = field(default=4096, metadata={"help": "semantic cache entries per model"})
    disconnect_grace_s: float = field(
        default=5.0,
        metadata={"help": "cancel a job this long after its last client stream went away"},
    )
    result_ttl_s: float = field(
        default=600.0, metadata={"help": "keep finished results this long for retried ids"}
    )
    metrics_port: int = field(default=0, metadata={"help": "Prometheus port (0: off)"})
    fallback_tokens: float = field(
        default=256.0, metadata={"help": "fallback prediction before any observation"}
    )


def build_policy(cfg: SchedulerConfig) -> Policy:
    """The policy these flags describe (raises PolicyError for a bad one)."""
    return PolicySettings.of(cfg).policy(cfg.policy, allow_oracle=cfg.benchmark_mode)
