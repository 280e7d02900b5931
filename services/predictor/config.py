"""Configuration of the predictor service (flags and SHORTLINE_PREDICTOR_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.predictor.heads import SHIPPED_HEADS_DIR
from shortline.common import paths
from shortline.common.tls import TlsSettings

VERSIONS_DIR_ENV = "SHORTLINE_PREDICTOR_VERSIONS_DIR"


def default_versions_dir() -> str:
    """The predictor's own ``$SHORTLINE_PREDICTOR_VERSIONS_DIR`` (a container that sets it
    for the predictor steers the train and rollout commands run beside it too), else
    ``<run dir>/predictor/versions`` (``$SHORTLINE_RUN_DIR``, else ``.run``). Not created
    here: the folder is optional until a version is trained into it."""
    import os

    if os.environ.get(VERSIONS_DIR_ENV):
        return os.environ[VERSIONS_DIR_ENV]
    run = os.environ.get("SHORTLINE_RUN_DIR", str(paths.REPO_ROOT / ".run"))
    return os.path.join(run, "predictor", "versions")


@dataclass(frozen=True)
class PredictorConfig(TlsSettings):
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50061, metadata={"help": "gRPC port"})
    heads_dir: str = field(
        default=str(SHIPPED_HEADS_DIR),
        metadata={"help": "folder with one sub-folder (card.json + *.npz) per target model"},
    )
    versions_dir: str = field(
        default_factory=default_versions_dir,
        metadata={
            "help": "head versions folder (<target>/manifest.json names the serving and canary "
            "versions, <target>/<version>/ holds each): watched, so a promote or rollback "
            "takes effect without a restart; the --heads-dir heads stay the base versions "
            "(default <run dir>/predictor/versions; '' or off: none)"
        },
    )
    versions_reload_s: float = field(
        default=2.0,
        metadata={
            "help": "how often the versions folder's manifests are checked (one stat each); "
            "a change loads off the serving path"
        },
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

    @property
    def versions_path(self) -> Path | None:
        """The versions folder, or None when switched off."""
        if self.versions_dir in ("", "off"):
            return None
        return Path(self.versions_dir)
