"""Configuration of the worker and of the embedded Triton server (flags and env).

Which models a worker serves: ``--models auto`` (the default) registers what its
Triton serves (its repository index, READY models), each with the prompt format
and max tokens of ``--model-settings`` and the predictor head of
``--length-models``; an explicit ``--models NAME=FORMAT:MAX_TOKENS,...`` is used
as given. The defaults cover the embedded models, so ``shortline up`` needs no flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.worker.prompts import ModelSpec, parse_models
from shortline.common.limits import MAX_NAME_CHARS
from shortline.common.tls import TlsSettings

SMOLLM2 = "smollm2-135m-instruct"
REPLAY = "replay"
AUTO = "auto"
# The scheduler's --default-length-model: the head the embedded models used before
# the mapping existed (no head is trained on SmolLM2 or on replayed traces).
DEFAULT_HEAD = "Meta-Llama-3-8B-Instruct"


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
        default=AUTO,
        metadata={
            "help": "auto: serve the models Triton serves (its repository index), with "
            "--model-settings; or an explicit NAME=PROMPT_FORMAT:MAX_TOKENS,... list; "
            "formats: smollm2, chatml, llama3, raw"
        },
    )
    model_settings: str = field(
        default=f"{SMOLLM2}=smollm2:4096,{REPLAY}=raw:65536",
        metadata={
            "help": "with --models auto: NAME=PROMPT_FORMAT:MAX_TOKENS per model Triton may "
            "serve; a served model without settings stops the worker at start"
        },
    )
    length_models: str = field(
        default=f"{SMOLLM2}={DEFAULT_HEAD},{REPLAY}={DEFAULT_HEAD}",
        metadata={
            "help": "SERVED=TARGET,...: the predictor head (target model) for each served "
            "model's requests that name no length_model; a model not listed gets the "
            "scheduler's --default-length-model"
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
        # Parsed now, so that a bad value names its flag before anything starts.
        if self.models.strip() != AUTO:
            _parsed("--models", self.models)
        if self.model_settings.strip():
            _parsed("--model-settings", self.model_settings)
        parse_length_models(self.length_models)

    @property
    def auto(self) -> bool:
        """Whether the served models come from Triton's repository index."""
        return self.models.strip() == AUTO

    def explicit_models(self) -> dict[str, ModelSpec]:
        """``--models`` as given (not ``auto``)."""
        return parse_models(self.models)

    def settings(self) -> dict[str, ModelSpec]:
        """``--model-settings``: what an auto worker knows of the models Triton may serve."""
        return parse_models(self.model_settings) if self.model_settings.strip() else {}

    def head_targets(self) -> dict[str, str]:
        """``--length-models``: served model -> predictor head."""
        return parse_length_models(self.length_models)


def _parsed(flag: str, spec: str) -> dict[str, ModelSpec]:
    try:
        return parse_models(spec)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from exc


def parse_length_models(spec: str) -> dict[str, str]:
    """``SERVED=TARGET,...`` as a mapping; raises ValueError naming --length-models."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        served, sep, target = (s.strip() for s in item.partition("="))
        if not sep or not served or not target:
            raise ValueError(f"--length-models: expected SERVED=TARGET, got {item!r}")
        for name in (served, target):
            if len(name) > MAX_NAME_CHARS or not name.isprintable():
                raise ValueError(
                    f"--length-models: {name[:MAX_NAME_CHARS]!r} must be printable and at "
                    f"most {MAX_NAME_CHARS} characters"
                )
        if served in mapping and mapping[served] != target:
            raise ValueError(
                f"--length-models: {served} is mapped twice ({mapping[served]}, {target})"
            )
        mapping[served] = target
    return mapping
