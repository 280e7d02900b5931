"""Where the project finds shared data and keeps its run-time files.

Data is read in place from ``../shared/data`` (never copied into the
repository); ``SHORTLINE_DATA`` overrides it for installs elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The shared data folder; may not exist (the services then run on shipped heads)."""
    env = os.environ.get("SHORTLINE_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


def alpaca_eval_outputs(target_model: str) -> Path:
    return data_dir() / "prompts" / "alpaca_eval" / target_model / "model_outputs.json"


def azure_trace(kind: str = "conv") -> Path:
    return data_dir() / "traces" / "azure2023" / f"AzureLLMInferenceTrace_{kind}.csv"


def run_dir() -> Path:
    """Run-time files (Triton workspaces, logs, outcome logs); created on demand."""
    path = Path(os.environ.get("SHORTLINE_RUN_DIR", REPO_ROOT / ".run"))
    path.mkdir(parents=True, exist_ok=True)
    return path
