"""Each cross-reference check of k8s_checks finds what it guards against.

A check that never fails proves nothing: every test here takes the rendered CPU
overlay (which passes every check), breaks one thing the way a careless edit
would, and expects the check to name it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import k8s_checks as k
import pytest

Obj = dict[str, Any]
Check = Callable[[list[Obj]], list[str]]


@pytest.fixture(scope="module")
def good() -> dict[str, list[Obj]]:
    objects = {target: k.render(target) for target in ("overlays/cpu", "overlays/gpu")}
    for target, rendered in objects.items():
        for check in k.CHECKS:
            assert check(rendered) == [], (target, check.__name__)
    return objects


def broken(objects: list[Obj], kind: str, name: str) -> tuple[list[Obj], Obj]:
    """A deep copy of the objects, and the one to break in it."""
    copied = copy.deepcopy(objects)
    found = k.find(copied, kind, name)
    assert found is not None, (kind, name)
    return copied, found


def container(workload: Obj, name: str) -> Obj:
    pod = k.pod_spec(workload)
    return next(c for c in k.all_containers(pod) if c["name"] == name)


def expect(check: Check, objects: list[Obj], words: str) -> None:
    problems = check(objects)
    assert any(words in p for p in problems), problems


def test_selectors_flag_match_expressions(good: dict[str, list[Obj]]) -> None:
    objects, pdb = broken(good["overlays/cpu"], "PodDisruptionBudget", "shortline-worker")
    pdb["spec"]["selector"]["matchExpressions"] = [{"key": "a", "operator": "Exists"}]
    expect(k.check_selectors, objects, "matchExpressions")


def test_services_flag_a_selector_without_pods_and_a_closed_port(
    good: dict[str, list[Obj]],
) -> None:
    objects, svc = broken(good["overlays/cpu"], "Service", "shortline-predictor")
    svc["spec"]["selector"] = {"app.kubernetes.io/component": "predictr"}
    expect(k.check_services, objects, "selects no pod")
    objects, svc = broken(good["overlays/cpu"], "Service", "shortline-scheduler")
    svc["spec"]["ports"][0]["targetPort"] = "grcp"
    expect(k.check_services, objects, "targetPort grcp not open")


def test_probes_flag_a_wrong_port_a_missing_probe_and_two_handlers(
    good: dict[str, list[Obj]],
) -> None:
    objects, sts = broken(good["overlays/cpu"], "StatefulSet", "shortline-scheduler")
    container(sts, "scheduler")["readinessProbe"]["grpc"]["port"] = 50053
    expect(k.check_probes, objects, "port 50053 is not opened")
    objects, worker = broken(good["overlays/cpu"], "Deployment", "shortline-worker")
    del container(worker, "triton")["livenessProbe"]  # a sidecar is checked too
    expect(k.check_probes, objects, "triton: no livenessProbe")
    objects, worker = broken(good["overlays/cpu"], "Deployment", "shortline-worker")
    container(worker, "worker")["livenessProbe"]["exec"] = {"command": ["true"]}
    expect(k.check_probes, objects, "2 handlers")


def test_references_flag_missing_objects_keys_mounts_and_governing_services(
    good: dict[str, list[Obj]],
) -> None:
    cpu = good["overlays/cpu"]
    objects, sts = broken(cpu, "StatefulSet", "shortline-scheduler")
    tokens = next(v for v in k.pod_spec(sts)["volumes"] if v["name"] == "tokens")
    tokens["secret"]["secretName"] = "shortline-token"
    expect(k.check_references, objects, "Secret shortline-token does not exist")
    objects, sts = broken(cpu, "StatefulSet", "shortline-scheduler")
    container(sts, "scheduler")["envFrom"][0]["configMapRef"]["name"] = "telemetry"
    expect(k.check_references, objects, "ConfigMap telemetry does not exist")
    objects, sts = broken(cpu, "StatefulSet", "shortline-scheduler")
    container(sts, "scheduler")["volumeMounts"][0]["name"] = "journal"
    expect(k.check_references, objects, "mounts unknown journal")
    objects, sts = broken(cpu, "StatefulSet", "shortline-scheduler")
    k.pod_spec(sts)["serviceAccountName"] = "shortline-scheduler-b"
    expect(k.check_references, objects, "ServiceAccount shortline-scheduler-b does not exist")
    objects, svc = broken(cpu, "Service", "shortline-scheduler-headless")
    svc["spec"]["clusterIP"] = "10.0.0.1"
    expect(k.check_references, objects, "is not headless")
    objects, svc = broken(cpu, "Service", "shortline-scheduler-headless")
    svc["spec"]["selector"]["shortline.io/pool"] = "b"
    expect(k.check_references, objects, "selects other pods")
    # An optional Secret may be absent; the same reference, required, may not.
    gpu = good["overlays/gpu"]
    objects, worker = broken(gpu, "Deployment", "shortline-worker")
    token = next(e for e in container(worker, "triton")["env"] if e["name"] == "HF_TOKEN")
    token["valueFrom"]["secretKeyRef"]["optional"] = False
    expect(k.check_references, objects, "Secret shortline-hf-token does not exist")
    objects, worker = broken(gpu, "Deployment", "shortline-worker")
    repo = next(v for v in k.pod_spec(worker)["volumes"] if "configMap" in v)
    repo["configMap"]["items"][1]["key"] = "model.yaml"
    expect(k.check_references, objects, "has no key model.yaml")


@pytest.mark.parametrize(
    "image",
    ["ghcr.io/shortline/shortline", "ghcr.io/shortline/shortline:latest", "localhost:5000/s"],
)
def test_images_flag_tagless_and_latest(good: dict[str, list[Obj]], image: str) -> None:
    objects, worker = broken(good["overlays/cpu"], "Deployment", "shortline-worker")
    container(worker, "triton")["image"] = image
    expect(k.check_images, objects, "has no tag")


def test_images_accept_a_tag_or_a_digest() -> None:
    assert k.image_tag("localhost:5000/s:1.2") == "1.2"
    assert k.image_tag("s@sha256:" + "0" * 64) == "@"


def test_resources_flag_a_missing_limit(good: dict[str, list[Obj]]) -> None:
    objects, worker = broken(good["overlays/cpu"], "Deployment", "shortline-worker")
    del container(worker, "triton")["resources"]["limits"]["memory"]
    expect(k.check_resources, objects, "triton: no limits.memory")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("runAsNonRoot", False, "may run as root"),
        ("runAsUser", 0, "may run as root"),
        ("allowPrivilegeEscalation", True, "privilege escalation"),
        ("privileged", True, "privilege escalation"),
        ("capabilities", {"drop": ["NET_RAW"]}, "capabilities not dropped"),
        ("capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]}, "adds capabilities"),
        ("seccompProfile", {"type": "Unconfined"}, "seccomp"),
        ("readOnlyRootFilesystem", False, "root filesystem is writable"),
    ],
)
def test_security_flags_each_weakened_setting(
    good: dict[str, list[Obj]], field: str, value: Any, words: str
) -> None:
    objects, pred = broken(good["overlays/cpu"], "Deployment", "shortline-predictor")
    container(pred, "predictor")["securityContext"][field] = value
    expect(k.check_security, objects, words)


def test_network_policies_flag_unselected_pods_peers_and_ports(
    good: dict[str, list[Obj]],
) -> None:
    cpu = good["overlays/cpu"]
    objects, pol = broken(cpu, "NetworkPolicy", "shortline-predictor")
    pol["spec"]["podSelector"] = {"matchLabels": {"app": "shortline-predictor"}}
    expect(k.check_network_policies, objects, "selects no pod")
    objects, pol = broken(cpu, "NetworkPolicy", "shortline-scheduler")
    pol["spec"]["ingress"][1]["from"][0]["podSelector"]["matchLabels"]["shortline.io/pool"] = "x"
    expect(k.check_network_policies, objects, "is no pod")
    objects, pol = broken(cpu, "NetworkPolicy", "shortline-worker")
    pol["spec"]["ingress"][0]["ports"] = [{"port": 50072}]
    expect(k.check_network_policies, objects, "port 50072 open on no pod")


def test_scaling_flags_missing_targets_pods_and_requests(good: dict[str, list[Obj]]) -> None:
    cpu = good["overlays/cpu"]
    objects, hpa = broken(cpu, "HorizontalPodAutoscaler", "shortline-worker")
    hpa["spec"]["scaleTargetRef"]["name"] = "worker"
    expect(k.check_disruption_and_scaling, objects, "Deployment worker does not exist")
    objects, pdb = broken(cpu, "PodDisruptionBudget", "shortline-predictor")
    pdb["spec"]["selector"]["matchLabels"]["shortline.io/pool"] = "default"
    expect(k.check_disruption_and_scaling, objects, "selects no pod")
    objects, pred = broken(cpu, "Deployment", "shortline-predictor")
    del container(pred, "predictor")["resources"]["requests"]["cpu"]
    expect(k.check_disruption_and_scaling, objects, "predictor requests no cpu")


def test_drain_flags_a_grace_shorter_than_the_drain_and_a_missing_pre_stop(
    good: dict[str, list[Obj]],
) -> None:
    objects, sts = broken(good["overlays/cpu"], "StatefulSet", "shortline-scheduler")
    args = container(sts, "scheduler")["args"]
    args[args.index("--drain-grace-s=20")] = "--drain-grace-s=30"
    expect(k.check_drain, objects, "grace 35 s < preStop 5 + drain 30.0 + 10")
    objects, worker = broken(good["overlays/cpu"], "Deployment", "shortline-worker")
    del container(worker, "worker")["lifecycle"]
    expect(k.check_drain, objects, "worker: no preStop sleep")
