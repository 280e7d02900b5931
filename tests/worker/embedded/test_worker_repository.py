"""The model repository the embedded Triton loads, without starting Triton: the
generated ``model.py`` must find ``TritonPythonModel`` by its module path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.worker.config import REPLAY, SMOLLM2, TritonServeConfig
from services.worker.triton.repository import model_params, write_model
from shortline.common.paths import REPO_ROOT


def test_generated_model_py_imports_triton_python_model(tmp_path: Path) -> None:
    write_model(tmp_path, REPLAY, TritonServeConfig(), REPO_ROOT)
    model_py = tmp_path / REPLAY / "1" / "model.py"
    check = (
        "import runpy, sys; ns = runpy.run_path(sys.argv[1]); "
        "assert callable(ns['TritonPythonModel'].initialize)"
    )
    # A fresh interpreter, as in the stub: the model module sets OMP_WAIT_POLICY on import.
    done = subprocess.run([sys.executable, "-c", check, str(model_py)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def test_model_config_is_a_decoupled_python_model_with_its_engine_parameters(
    tmp_path: Path,
) -> None:
    config = TritonServeConfig(replay_step_a_ms=7.0)
    write_model(tmp_path, REPLAY, config, REPO_ROOT)
    text = (tmp_path / REPLAY / "config.pbtxt").read_text()
    assert 'backend: "python"' in text
    assert "model_transaction_policy { decoupled: true }" in text
    assert 'key: "engine" value: { string_value: "replay" }' in text
    assert 'key: "step_a_ms" value: { string_value: "7.0" }' in text
    assert model_params(SMOLLM2, config)["engine"] == "smollm2"
    with pytest.raises(ValueError, match="unknown model"):
        model_params("ghost", config)
