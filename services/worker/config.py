"""Configuration of the worker and of the embedded Triton server (flags and env)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shortline.common.tls import TlsSettings

SMOLLM2 = "smollm2-135m-instruct"
REPLAY = "replay"


@dataclass(frozen=True)
class TritonServeConfig:
    """The embedded Triton server (``shortline triton serve``, ``worker serve --embedded``)."""

    grpc_port: int = field(default=0, metadata={"help": "gRPC port (0 picks a free one)"})
    http_port: int = field(default=0, metadata={"help": "HTTP port (0 picks a free one)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address Triton listens on"})
    models: str = field(
        default=f"{SMOLLM2},{REPLAY}", metadata={"help": "comma-separated models to load"}
    )
    replay_step_a_ms: float = field(
        default=20.0, metadata={"help": "replay: fixed part of a decoding step (ms)"}
    )
    replay_step_b_ms: float = field(
        default=2.0, metadata={"help": "replay: per-sequence part of a decoding step (ms)"}
    )
    smollm2_max_batch: int = field(
        default=16, metadata={"help": "smollm2: sequences decoded together at most"}
    )
    smollm2_precision: str = field(
        default="bf16",
        metadata={
            "help": "smollm2 weights: bf16 (about 1.5x faster than fp32 on this CPU, correct "
            "answers), fp32, or int8 (dynamic; faster still but it garbles this 135M model's "
            "answers, so only for throughput experiments)"
        },
    )
    smollm2_threads: int = field(
        default=0, metadata={"help": "smollm2: torch threads (0: torch's default)"}
    )
    metrics_port: int = field(
        default=0, metadata={"help": "Triton's Prometheus metrics port (0: metrics off)"}
    )
    startup_timeout_s: float = field(
        default=180.0, metadata={"help": "seconds to wait for Triton and its models"}
    )


@dataclass(frozen=True)
class WorkerConfig(TlsSettings):
    """One worker: a Triton endpoint, K slots, optionally a scheduler to join."""

    triton: str = field(default="", metadata={"help": "Triton gRPC address HOST:PORT"})
    embedded: bool = field(
        default=False, metadata={"help": "start an embedded Triton (ignores --triton)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address the worker listens on"})
    port: int = field(default=0, metadata={"help": "worker gRPC port (0 picks a free one)"})
    advertise_address: str = field(
        default="", metadata={"help": "HOST:PORT the scheduler should call (default host:port)"}
    )
    slots: int = field(default=8, metadata={"help": "concurrent sequences (K)"})
    worker_id: str = field(
        default="", metadata={"help": "worker id (default worker-<host>-<port>)"}
    )
    scheduler: str = field(
        default="",
        metadata={"help": "scheduler's internal HOST:PORT to register with (its --internal-port)"},
    )
    scheduler_identity: str = field(
        default="scheduler",
        metadata={
            "help": "with mutual TLS: certificate name(s), comma-separated, allowed to call "
            "Execute, Cancel and Preempt"
        },
    )
    models: str = field(
        default=f"{SMOLLM2}=smollm2:4096,{REPLAY}=raw:65536",
        metadata={
            "help": "served models as NAME=PROMPT_FORMAT:MAX_TOKENS, comma-separated; "
            "formats: smollm2, chatml, llama3, raw"
        },
    )
    metrics_port: int = field(default=0, metadata={"help": "Prometheus port (0: off)"})
    max_prompt_chars: int = field(
        default=65536, metadata={"help": "longest prompt plus resume text accepted (characters)"}
    )
    health_poll_s: float = field(
        default=1.0, metadata={"help": "seconds between Triton readiness checks"}
    )
    triton_timeout_s: float = field(
        default=600.0, metadata={"help": "longest a single Triton stream may run (s)"}
    )
    coalesce_ms: float = field(
        default=100.0,
        metadata={
            "help": "send a stream's tokens in chunks: the first at once, then what arrived "
            "every this many ms (or --coalesce-tokens, or the end); 0: every token alone"
        },
    )
    coalesce_tokens: int = field(
        default=16, metadata={"help": "send a chunk once this many tokens are waiting"}
    )
    drain_grace_s: float = field(
        default=20.0,
        metadata={
            "help": "on SIGTERM: how long running jobs may take to finish while no new one "
            "is taken; the rest are then handed back to the scheduler to resume elsewhere"
        },
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.coalesce_ms) and self.coalesce_ms >= 0):
            raise ValueError(f"--coalesce-ms must be >= 0 (0: off), got {self.coalesce_ms}")
        if self.coalesce_tokens < 1:
            raise ValueError(f"--coalesce-tokens must be >= 1, got {self.coalesce_tokens}")
