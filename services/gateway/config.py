"""Configuration of the gateway (flags and SHORTLINE_GATEWAY_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shortline.common.tls import TlsSettings


@dataclass(frozen=True)
class GatewayConfig(TlsSettings):
    """``tls_cert``/``tls_key`` serve HTTPS; ``tls_ca`` verifies the scheduler (TLS to it)."""

    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to listen on (loopback unless a deployment says otherwise)"},
    )
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    scheduler: str = field(
        default="127.0.0.1:50051", metadata={"help": "the scheduler's public address"}
    )
    scheduler_tls: bool = field(
        default=False,
        metadata={"help": "TLS to the scheduler with the system's roots (--tls-ca implies TLS)"},
    )
    token_file: str = field(
        default="",
        metadata={
            "help": "token sent for HTTP requests without an Authorization header (default: "
            "none, such requests reach the scheduler without a token); a bearer sent by the "
            "client always wins. Leave it empty on a gateway untrusted clients can reach"
        },
    )
    retries: int = field(
        default=6, metadata={"help": "SDK retries of a scheduler that is UNAVAILABLE"}
    )
    default_deadline_s: float = field(
        default=600.0,
        metadata={"help": "deadline of a request that names none (deadline_seconds field)"},
    )
    max_deadline_s: float = field(
        default=3600.0, metadata={"help": "longest deadline_seconds a request may ask"}
    )
    max_body_bytes: int = field(
        default=2 * 1024 * 1024, metadata={"help": "largest HTTP request body (413 above)"}
    )
    max_concurrent: int = field(
        default=512, metadata={"help": "requests in flight at once (429 above)"}
    )
    max_clients: int = field(
        default=64,
        metadata={"help": "scheduler channels kept, one per distinct bearer token (LRU)"},
    )
    drain_grace_s: float = field(
        default=20.0,
        metadata={
            "help": "on SIGTERM: no new connection, and the requests in flight may finish for "
            "this long before they are cancelled (a Kubernetes grace must cover it)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.drain_grace_s < 0:
            raise ValueError("--drain-grace-s must be >= 0")
        for name in ("default_deadline_s", "max_deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("max_body_bytes", "max_concurrent", "max_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.retries < 0:
            raise ValueError("--retries must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
