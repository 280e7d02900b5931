"""docker-compose.yml is valid Compose and matches what the README promises.

No Docker engine runs here: Compose v1's ``config`` validates the file offline
(installed by ``make setup`` into ``.venv-compose``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose_binary() -> str:
    local = ROOT / ".venv-compose" / "bin" / "docker-compose"
    if local.exists():
        return str(local)
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: run `make setup`")
    return found


def compose_config(*files: str) -> dict[str, Any]:
    argv = [compose_binary()]
    for name in files:
        argv += ["-f", str(ROOT / name)]
    out = subprocess.run([*argv, "config"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def readme_compose_table() -> list[tuple[str, list[int], list[str]]]:
    """Rows of the README's compose table: service, published ports, volumes."""
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- compose-services -->")[1].split("<!-- /compose-services -->")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        service = cells[0].strip("`")
        ports = [int(p) for p in re.findall(r"\d+", cells[1])]
        volumes = re.findall(r"`([^`]+)`", cells[2])
        rows.append((service, ports, volumes))
    return rows


def published_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["published"]))
        else:
            ports.add(int(str(entry).split(":")[0]))
    return ports


def test_compose_file_is_valid_and_has_the_whole_stack() -> None:
    config = compose_config("docker-compose.yml")
    services = config["services"]
    expected = {
        "triton",
        "predictor",
        "scheduler",
        "worker-1",
        "worker-2",
        "otel-collector",
        "jaeger",
        "prometheus",
    }
    assert expected <= set(services)
    for name in ("triton", "predictor", "scheduler", "worker-1", "worker-2"):
        assert "healthcheck" in services[name], f"{name} has no health check"
    assert services["scheduler"]["depends_on"]["predictor"]["condition"] == "service_healthy"
    for worker in ("worker-1", "worker-2"):
        deps = services[worker]["depends_on"]
        assert deps["triton"]["condition"] == "service_healthy"
        assert deps["scheduler"]["condition"] == "service_healthy"


def test_every_service_port_and_volume_named_in_the_readme_exists() -> None:
    config = compose_config("docker-compose.yml")
    rows = readme_compose_table()
    assert rows, "README has no compose table"
    named = {r[0] for r in rows}
    assert named == set(config["services"]), "README and compose list different services"
    for service, ports, volumes in rows:
        spec = config["services"][service]
        assert set(ports) == published_ports(spec), f"{service}: ports differ from README"
        mounted = {
            str(v).split(":")[0] if isinstance(v, str) else v["source"]
            for v in spec.get("volumes", [])
        }
        for volume in volumes:
            assert any(m.endswith(volume.lstrip("./")) or m == volume for m in mounted), (
                f"{service}: README names volume {volume}, compose mounts {sorted(mounted)}"
            )


def test_gpu_override_swaps_triton_and_keeps_workers() -> None:
    config = compose_config("docker-compose.yml", "deploy/compose.gpu.yml")
    triton = config["services"]["triton"]
    assert triton["command"][0] == "tritonserver"
    assert triton["build"]["context"].endswith("deploy/triton-vllm")
    assert "--triton=triton:8001" in config["services"]["worker-1"]["command"]


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("version: '3.8'\nservices:\n  x:\n    ports: 12\n")
    out = subprocess.run(
        [compose_binary(), "-f", str(broken), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
