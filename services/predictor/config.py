"""Configuration of the predictor service (flags and SHORTLINE_PREDICTOR_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.predictor.heads import SHIPPED_HEADS_DIR
from shortline.common.tls import TlsSettings


@dataclass(frozen=True)
class PredictorConfig(TlsSettings):
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50061, metadata={"help": "gRPC port"})
    heads_dir: str = field(
        default=str(SHIPPED_HEADS_DIR),
        metadata={"help": "folder with one sub-folder (card.json + *.npz) per target model"},
    )
    batch_window_ms: float = field(
        default=3.0,
        metadata={"help": "requests arriving within this window share one encoder pass"},
    )
    max_batch_prompts: int = field(
        default=256, metadata={"help": "prompts per encoder pass (a batch closes when full)"}
    )
    threads: int = field(
        default=2, metadata={"help": "torch intra-op threads for the encoder (0 = torch default)"}
    )
    metrics_port: int = field(default=0, metadata={"help": "Prometheus port (0: off)"})
    precision: str = field(
        default="auto",
        metadata={"help": "encoder precision: auto (bf16 if the CPU has it), bf16 or fp32"},
    )

    backend: str = field(
        default="auto",
        metadata={
            "help": "encoder backend: auto (onnx-int8 if onnxruntime is installed, else torch), "
            "torch, hybrid (one prompt in ONNX Runtime fp32, batches in torch bf16), onnx (fp32), "
            "or onnx-int8 (least CPU; one prompt per run; held-out tau within 0.005 of torch)"
        },
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
