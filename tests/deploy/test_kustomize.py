"""deploy/k8s renders, validates and fits together, for every overlay and component.

No cluster here: `kubectl kustomize` renders each target, kubernetes-validate
checks every object against the strict schema of the oldest and the newest
Kubernetes we support, and k8s_checks cross-references the objects. The tests
below then check what Shortline itself needs of them: each pool's workers find
their scheduler, the journal is on the volume, only workers reach the internal
port, the GPU worker serves the model Triton loads, with a predictor head.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s_checks import (
    CHECKS,
    K8S,
    ROOT,
    TARGETS,
    containers,
    find,
    flag,
    name,
    pod_spec,
    render,
    selects,
    workloads,
)

# The oldest and newest Kubernetes the manifests support: native sidecars and
# gRPC probes need 1.29+; 1.30 is the oldest release still maintained upstream.
KUBERNETES = ("1.30", "1.37")
IMAGE = "ghcr.io/shortline/shortline"
SERVED = "qwen2.5-7b-instruct"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {target: render(target) for target in TARGETS}


def shortline(objects: list[Obj], service: str) -> list[tuple[Obj, Obj]]:
    """(workload, container) of every Shortline container running `service`."""
    return [
        (w, c)
        for w in workloads(objects)
        for c in containers(pod_spec(w))
        if c["image"].startswith(IMAGE) and c.get("args", [""])[0] == service
    ]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("version", KUBERNETES)
def test_every_object_is_valid_kubernetes(
    rendered: dict[str, list[Obj]], target: str, version: str
) -> None:
    """Strict: an unknown field (a typo) fails too. No custom resources: every kind
    must have a schema here, so nothing is applied that was not validated."""
    for obj in rendered[target]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{target}: {name(obj)} at {path}: {e.message} (Kubernetes {version})")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{target}: {e.message}")


@pytest.mark.parametrize("target", TARGETS)
def test_objects_reference_each_other_consistently(
    rendered: dict[str, list[Obj]], target: str
) -> None:
    problems = [p for check in CHECKS for p in check(rendered[target])]
    assert problems == [], "\n".join(problems)


def test_one_image_and_tag_for_every_shortline_service(rendered: dict[str, list[Obj]]) -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    tag = next(i["newTag"] for i in base["images"] if i["name"] == IMAGE)
    for target, objects in rendered.items():
        images = {
            c["image"]
            for w in workloads(objects)
            for c in containers(pod_spec(w))
            if c["image"].startswith(IMAGE)
        }
        assert images == {f"{IMAGE}:{tag}"}, target


def test_every_shortline_argument_is_one_the_service_accepts(
    rendered: dict[str, list[Obj]],
) -> None:
    """The real CLI parses each container's arguments: a misspelt or removed flag
    fails here, not in a crash loop."""
    from shortline.cli import build_parser

    parser = build_parser()
    for target, objects in rendered.items():
        for w, c in (
            pair
            for s in ("scheduler", "worker", "predictor", "triton", "gateway")
            for pair in shortline(objects, s)
        ):
            try:
                parser.parse_args(c["args"])
            except SystemExit:
                pytest.fail(f"{target} {name(w)}: `shortline {' '.join(c['args'])}` is refused")


def test_listen_flags_match_the_named_container_ports(rendered: dict[str, list[Obj]]) -> None:
    """Services, probes and policies name the ports `grpc` and `metrics`: those must be
    where the service listens (its flags), on the pod's address."""
    for objects in rendered.values():
        for service in ("scheduler", "worker", "predictor"):
            for w, c in shortline(objects, service):
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert flag(c["args"], "port") == str(ports["grpc"]), name(w)
                assert flag(c["args"], "metrics-port") == str(ports["metrics"]), name(w)
                assert flag(c["args"], "host") == "0.0.0.0", name(w)  # pod IP, for Services


def test_each_pool_has_a_stateful_scheduler_with_its_journal_on_a_volume(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["examples/two-pools-gpu-mtls"]
    schedulers = shortline(objects, "scheduler")
    assert {w["metadata"]["name"] for w, _ in schedulers} == {
        "shortline-scheduler",
        "shortline-scheduler-b",
    }
    for w, c in schedulers:
        assert w["kind"] == "StatefulSet" and w["spec"]["replicas"] == 1
        claims = {t["metadata"]["name"] for t in w["spec"]["volumeClaimTemplates"]}
        on_claims = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims]
        for path_flag in ("journal", "outcome-log"):
            path = flag(c["args"], path_flag)
            assert path and any(path.startswith(f"{m}/") for m in on_claims), (path_flag, path)


def test_each_pools_workers_register_with_their_own_scheduler(
    rendered: dict[str, list[Obj]],
) -> None:
    objects = rendered["examples/two-pools-gpu-mtls"]
    for w, c in shortline(objects, "worker"):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert flag(c["args"], "scheduler") == "$(SCHEDULER_HOST):50052"
        service = find(objects, "Service", env["SCHEDULER_HOST"])
        assert service is not None, name(w)
        pool = w["spec"]["template"]["metadata"]["labels"]["shortline.io/pool"]
        (sts,) = [
            s
            for s, _ in shortline(objects, "scheduler")
            if selects(
                {"matchLabels": service["spec"]["selector"]},
                s["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert sts["spec"]["template"]["metadata"]["labels"]["shortline.io/pool"] == pool
        assert {p["port"] for p in service["spec"]["ports"]} >= {50052}
        # Its autoscaler reads its own pool's metrics.
        hpa = next(
            o
            for o in objects
            if o["kind"] == "HorizontalPodAutoscaler"
            and o["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]
        )
        for metric in hpa["spec"]["metrics"]:
            assert metric["external"]["metric"]["selector"]["matchLabels"] == {"pool": pool}
        assert flag(c["args"], "worker-id") == "$(POD_NAME)"  # unique per pod


def _ingress(objects: list[Obj], pod_labels: dict[str, str], port: str) -> list[Obj]:
    """The peers admitted to a named port of pods with these labels ([{}]: anyone)."""
    peers: list[Obj] = []
    for pol in (o for o in objects if o["kind"] == "NetworkPolicy"):
        if not selects(pol["spec"]["podSelector"], pod_labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            if any(p["port"] == port for p in rule.get("ports", [])) or not rule.get("ports"):
                peers += rule.get("from", [{}])
    return peers


def test_network_policies_admit_only_the_callers_each_port_expects(
    rendered: dict[str, list[Obj]],
) -> None:
    for target, objects in rendered.items():
        deny = find(objects, "NetworkPolicy", "shortline-default-deny")
        assert deny is not None and deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
        for w in workloads(objects):
            labels = w["spec"]["template"]["metadata"]["labels"]
            role = labels["app.kubernetes.io/component"]
            pool = labels.get("shortline.io/pool")
            same_pool = {"app.kubernetes.io/component": "", "shortline.io/pool": pool}
            if role == "scheduler":
                assert _ingress(objects, labels, "grpc") == [{}], target  # clients
                assert _ingress(objects, labels, "internal") == [
                    {
                        "podSelector": {
                            "matchLabels": {**same_pool, "app.kubernetes.io/component": "worker"}
                        }
                    }
                ], target
            if role == "worker":
                assert _ingress(objects, labels, "grpc") == [
                    {
                        "podSelector": {
                            "matchLabels": {**same_pool, "app.kubernetes.io/component": "scheduler"}
                        }
                    }
                ], target
                for port in ("triton-grpc", "triton-http"):
                    assert _ingress(objects, labels, port) == [], (target, port)
            if role == "predictor":
                assert _ingress(objects, labels, "grpc") == [
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "scheduler"}}}
                ], target
            assert _ingress(objects, labels, "metrics") != [{}], (target, name(w))


def test_the_tokens_secret_is_mounted_as_a_folder_and_parses(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    """The scheduler refuses to start without a valid tokens file: the placeholder
    parses (and admits nobody), and a directory mount lets rotation reach it."""
    import base64

    from shortline.common.auth import TokenStore

    for objects in rendered.values():
        for w, c in shortline(objects, "scheduler"):
            tokens = Path(flag(c["args"], "tokens-file") or "")
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(tokens.parent)]
            assert "subPath" not in mount
            volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == mount["name"])
            secret = find(objects, "Secret", volume["secret"]["secretName"])
            assert secret is not None, name(w)
            text = base64.b64decode(secret["data"][tokens.name]).decode()
            path = tmp_path / "tokens.toml"
            path.write_text(text)
            assert TokenStore(str(path)).authenticate("anything") is None


def test_the_gpu_worker_serves_the_model_triton_loads(rendered: dict[str, list[Obj]]) -> None:
    for target in ("overlays/gpu", "examples/two-pools-gpu-mtls"):
        objects = rendered[target]
        for w, c in shortline(objects, "worker"):
            pod = pod_spec(w)
            (triton,) = [s for s in containers(pod) if s["name"] == "triton"]
            assert triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-vllm-python-py3"
            for part in ("requests", "limits"):
                assert triton["resources"][part]["nvidia.com/gpu"] == "1"
            (mount,) = [m for m in triton["volumeMounts"] if m["mountPath"].startswith("/models/")]
            assert mount["mountPath"] == f"/models/{SERVED}"
            assert flag(triton["args"], "model-repository") == "/models"
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            repo = find(objects, "ConfigMap", volume["configMap"]["name"])
            assert repo is not None
            paths = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
            assert paths == {"config.pbtxt": "config.pbtxt", "model.json": "1/model.json"}
            assert re.search(r'^backend: "vllm"$', repo["data"]["config.pbtxt"], re.M)
            assert json.loads(repo["data"]["model.json"])["model"] == "Qwen/Qwen2.5-7B-Instruct"
            token = next(e for e in triton["env"] if e["name"] == "HF_TOKEN")
            assert token["valueFrom"]["secretKeyRef"] == {
                "name": "shortline-hf-token",
                "key": "token",
                "optional": True,
            }
            # The worker registers what Triton serves, knows its format, and has a head.
            assert flag(c["args"], "models") == "auto"
            assert flag(c["args"], "model-settings") == f"{SERVED}=chatml:8192"
            served, head = (flag(c["args"], "length-models") or "=").split("=")
            assert served == SERVED
            assert (
                ROOT / "services/predictor/artifacts/heads_distilled" / head / "card.json"
            ).exists()


def test_the_cpu_worker_runs_the_embedded_triton_with_the_defaults(
    rendered: dict[str, list[Obj]],
) -> None:
    for w, c in shortline(rendered["overlays/cpu"], "worker"):
        assert flag(c["args"], "models") is None  # the defaults register what it serves
        assert flag(c["args"], "triton") == "127.0.0.1:8001"
        (triton,) = [s for s in containers(pod_spec(w)) if s["name"] == "triton"]
        assert triton["args"][:2] == ["triton", "serve"] and triton["restartPolicy"] == "Always"
        assert flag(triton["args"], "grpc-port") == "8001"


def test_the_autoscaler_metrics_exist_in_the_services_and_the_adapter_rules(
    rendered: dict[str, list[Obj]],
) -> None:
    """Worker HPAs ask for External metrics the prometheus-adapter rules define, from
    metric names the services really export, with the label the scrape config adds."""
    from prometheus_client.metrics import MetricWrapperBase

    import services.scheduler.metrics
    import services.worker.metrics

    exported = {
        m._name
        for module in (services.scheduler.metrics, services.worker.metrics)
        for m in vars(module).values()
        if isinstance(m, MetricWrapperBase)
    }
    rules = yaml.safe_load((K8S / "base/prometheus/adapter-rules.yaml").read_text())
    defined = {r["name"]["as"] for r in rules["externalRules"]}
    for rule in rules["externalRules"]:
        used = set(re.findall(r"shortline_\w+", rule["seriesQuery"] + rule["metricsQuery"]))
        assert used <= exported, used - exported
    for objects in rendered.values():
        for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] == "External":
                    assert metric["external"]["metric"]["name"] in defined
    scrape = yaml.safe_load((K8S / "base/prometheus/prometheus.yml").read_text())
    relabels = scrape["scrape_configs"][0]["relabel_configs"]
    assert {
        "source_labels": ["__meta_kubernetes_pod_label_shortline_io_pool"],
        "target_label": "pool",
    } in relabels


def test_the_gpu_model_repository_is_the_one_compose_serves() -> None:
    """kustomize reads no file outside its folder, so components/gpu keeps a copy of
    deploy/model_repository: the two must not drift apart."""
    compose = ROOT / "deploy" / "model_repository" / SERVED
    k8s = K8S / "components" / "gpu" / "model_repository" / SERVED
    if not compose.exists():
        pytest.fail(f"{compose} is gone: update components/gpu and this test together")
    assert (k8s / "config.pbtxt").read_bytes() == (compose / "config.pbtxt").read_bytes()
    assert (k8s / "model.json").read_bytes() == (compose / "1" / "model.json").read_bytes()


def test_the_alert_rules_and_dashboard_are_the_ones_compose_loads() -> None:
    """kustomize reads no file outside its folder, so base/ keeps copies of the alert
    rules (promtool-tested in tests/common) and the dashboard: they must not drift."""
    pairs = (
        (ROOT / "deploy" / "prometheus" / "rules.yml", K8S / "base" / "prometheus" / "rules.yml"),
        (
            ROOT / "deploy" / "grafana" / "dashboards" / "shortline.json",
            K8S / "base" / "grafana" / "shortline.json",
        ),
    )
    for original, copy in pairs:
        assert copy.read_bytes() == original.read_bytes(), f"{copy} differs from {original}"
