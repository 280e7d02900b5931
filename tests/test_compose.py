"""docker-compose.yml is valid Compose and matches what the README promises; it and
the Kubernetes manifests set every listener's address explicitly.

No Docker engine runs here: Compose v1's ``config`` validates the file offline
(installed by ``make setup`` into ``.venv-compose``). The Kubernetes manifests are
checked as YAML for what the services need (no cluster here either).
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


def published(service: dict[str, Any]) -> dict[int, str]:
    """Published port -> the host address it is bound to ("" for every interface).

    ``compose config`` prints ``HOST_IP:PUBLISHED:TARGET/PROTO`` strings for ports
    with an address, and ``{published, target}`` mappings for the others.
    """
    ports: dict[int, str] = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["published"])] = str(entry.get("host_ip", ""))
            continue
        parts = str(entry).split("/")[0].split(":")
        host = parts[0] if len(parts) == 3 else ""
        ports[int(parts[-2] if len(parts) >= 2 else parts[0])] = host
    return ports


def published_ports(service: dict[str, Any]) -> set[int]:
    return set(published(service))


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


SHORTLINE_SERVICES = ("triton", "predictor", "scheduler", "worker-1", "worker-2")


def flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a mapping."""
    return dict(a[2:].split("=", 1) for a in map(str, command) if a.startswith("--") and "=" in a)


def test_compose_sets_every_address_and_publishes_only_the_public_port_widely() -> None:
    config = compose_config("docker-compose.yml")
    services = config["services"]
    for name in SHORTLINE_SERVICES:
        assert flags(services[name]["command"]).get("host") == "0.0.0.0", name
    for name, spec in services.items():
        wide = {port for port, host in published(spec).items() if host != "127.0.0.1"}
        expected = {50051} if name == "scheduler" else set()
        assert wide == expected, f"{name} publishes {sorted(wide)} beyond 127.0.0.1"
    scheduler = flags(services["scheduler"]["command"])
    assert scheduler["internal-host"] == "0.0.0.0" and scheduler["internal-port"] == "50052"
    assert 50052 not in published_ports(services["scheduler"])
    # The public port on 0.0.0.0 needs tokens: the file comes from a compose secret.
    (secret,) = services["scheduler"]["secrets"]
    assert scheduler["tokens-file"] == f"/run/secrets/{secret['target']}"
    assert config["secrets"][secret["source"]]["file"].endswith("deploy/secrets/tokens.toml")
    for worker in ("worker-1", "worker-2"):
        assert flags(services[worker]["command"])["scheduler"] == "scheduler:50052"


def test_the_tokens_folder_is_ignored_by_git() -> None:
    paths = ["deploy/secrets/tokens.toml", "deploy/secrets/token"]
    out = subprocess.run(
        ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.stdout.split() == paths, out.stderr


def test_the_gpu_triton_binds_explicit_addresses() -> None:
    config = compose_config("docker-compose.yml", "deploy/compose.gpu.yml")
    triton = config["services"]["triton"]
    args = flags(triton["command"])
    assert args["grpc-address"] == args["http-address"] == args["metrics-address"] == "0.0.0.0"
    assert set(published(triton).values()) == {"127.0.0.1"}


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for file in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        objects += [d for d in yaml.safe_load_all(file.read_text()) if d]
    for obj in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj
    return objects


def k8s_containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Shortline containers by service (the first argument: scheduler, worker, ...)."""
    found = {}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            pod = obj["spec"]["template"]["spec"]
            for container in pod["containers"]:
                found[container["args"][0]] = {"container": container, "pod": pod}
    return found


def test_k8s_sets_every_address_and_mounts_the_tokens_secret() -> None:
    objects = k8s_objects()
    containers = k8s_containers(objects)
    assert set(containers) == {"scheduler", "predictor", "worker"}
    for name, found in containers.items():
        assert flags(found["container"]["args"]).get("host") == "0.0.0.0", name
    scheduler = containers["scheduler"]
    args = flags(scheduler["container"]["args"])
    assert args["internal-host"] == "0.0.0.0" and args["internal-port"] == "50052"
    mounts = {m["name"]: m["mountPath"] for m in scheduler["container"]["volumeMounts"]}
    volumes = {v["name"]: v for v in scheduler["pod"]["volumes"]}
    tokens_dir = str(Path(args["tokens-file"]).parent)
    (volume,) = [n for n, path in mounts.items() if path == tokens_dir]
    assert volumes[volume]["secret"]["secretName"] == "shortline-tokens"
    assert "subPath" not in str(scheduler["container"]["volumeMounts"])  # updates reach it
    assert flags(containers["worker"]["container"]["args"])["scheduler"] == (
        "shortline-scheduler:50052"
    )
    service = next(
        o
        for o in objects
        if o["kind"] == "Service" and o["metadata"]["name"] == "shortline-scheduler"
    )
    assert {p["port"] for p in service["spec"]["ports"]} >= {50051, 50052}


def test_k8s_lets_only_workers_reach_the_internal_port() -> None:
    policies = {
        o["metadata"]["name"]: o["spec"] for o in k8s_objects() if o["kind"] == "NetworkPolicy"
    }
    rules = policies["shortline-scheduler"]["ingress"]
    internal = [r for r in rules if {"port": 50052} in r.get("ports", [])]
    assert internal == [
        {
            "from": [{"podSelector": {"matchLabels": {"app": "shortline-worker"}}}],
            "ports": [{"port": 50052}],
        }
    ]
    worker_rules = policies["shortline-worker"]["ingress"]
    execute = [r for r in worker_rules if {"port": 50071} in r.get("ports", [])]
    assert execute[0]["from"] == [{"podSelector": {"matchLabels": {"app": "shortline-scheduler"}}}]
