"""The GPU compose override, checked by rendering (no GPU here, no run).

The base file merged with deploy/compose.gpu.yml the way Compose merges an
override (mappings key by key, anything else replaced) must give workers whose
model settings and head mapping name exactly the models of
deploy/model_repository, each a vLLM model naming a hub model, each mapped to a
head the predictor ships, and a hub token passed by reference only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from services.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "deploy" / "model_repository"
HEADS = ROOT / "services" / "predictor" / "artifacts" / "heads"
WORKERS = ("worker-1", "worker-2")


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return override


def _rendered() -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu = yaml.safe_load((ROOT / "deploy" / "compose.gpu.yml").read_text())
    merged: dict[str, Any] = _merge(base, gpu)
    return merged


def _worker_config(service: dict[str, Any]) -> WorkerConfig:
    """The worker's settings as it would read them (flags in its command, then env)."""
    env = service["environment"]
    flags = " ".join(service["command"])
    for flag in ("--models", "--model-settings", "--length-models"):
        assert flag not in flags, f"{flag} in the command would win over the override's env"
    return WorkerConfig(
        models=env["SHORTLINE_WORKER_MODELS"],
        model_settings=env["SHORTLINE_WORKER_MODEL_SETTINGS"],
        length_models=env["SHORTLINE_WORKER_LENGTH_MODELS"],
    )


def test_repository_models_are_vllm_models_naming_a_hub_model() -> None:
    models = sorted(p.name for p in REPOSITORY.iterdir() if p.is_dir())
    assert models, "deploy/model_repository holds no model"
    for name in models:
        config = (REPOSITORY / name / "config.pbtxt").read_text()
        assert re.search(r'^backend:\s*"vllm"', config, re.M), name
        engine = json.loads((REPOSITORY / name / "1" / "model.json").read_text())
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", engine["model"]), engine
        assert 0 < engine.get("gpu_memory_utilization", 0.9) <= 1


def test_gpu_workers_serve_exactly_the_repository_with_shipped_heads() -> None:
    services = _rendered()["services"]
    served = {p.name for p in REPOSITORY.iterdir() if p.is_dir()}
    heads = {p.name for p in HEADS.iterdir() if (p / "card.json").is_file()}
    for name in WORKERS:
        config = _worker_config(services[name])
        assert config.auto
        assert set(config.settings()) == served
        assert set(config.head_targets()) == served
        assert set(config.head_targets().values()) <= heads
        assert "--triton=triton:8001" in services[name]["command"]
        # The base file's settings survive the merge.
        assert services[name]["environment"]["OTEL_SERVICE_NAME"] == "shortline-worker"
    assert services["triton"]["command"][0] == "tritonserver"
    assert "./deploy/model_repository:/models:ro" in services["triton"]["volumes"]


def test_hub_token_is_passed_by_reference_only() -> None:
    rendered = _rendered()
    triton = rendered["services"]["triton"]
    env = triton["environment"]
    assert "HF_TOKEN" not in env  # a value there would show in `docker inspect`
    assert env["HF_TOKEN_PATH"] == "/run/secrets/hf_token"
    assert {"source": "hf-token", "target": "hf_token"} in triton["secrets"]
    secret = rendered["secrets"]["hf-token"]["file"]
    assert secret.startswith("${HF_TOKEN_FILE:-./deploy/secrets/"), secret
    ignore = (ROOT / "deploy" / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore  # the token file can never be committed
    text = (ROOT / "deploy" / "compose.gpu.yml").read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)  # no token in the file
