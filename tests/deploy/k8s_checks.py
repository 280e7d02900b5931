"""Cross-reference checks over rendered Kubernetes objects, and how to render them.

The schema (kubernetes-validate) says each object is well formed on its own; these
checks say the objects fit together: a Service that selects no pod, a probe on a
port nobody opens or a volume naming a missing Secret are all schema-valid and
all fail only once applied. Each check returns the problems it found, one line
each, so a test can show every problem at once (tests/deploy/test_k8s_checks.py feeds
each one a broken object to show it can fail).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from tools import kubectl

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# Everything an operator can apply, and the example that combines every component.
TARGETS = ("overlays/cpu", "overlays/gpu", "examples/two-pools-gpu-mtls")
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")

Obj = dict[str, Any]


def render(target: str) -> list[Obj]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {target}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def find(objects: list[Obj], kind: str, obj_name: str) -> Obj | None:
    return next(
        (o for o in objects if o["kind"] == kind and o["metadata"]["name"] == obj_name), None
    )


def workloads(objects: list[Obj]) -> Iterator[Obj]:
    return (o for o in objects if o["kind"] in WORKLOADS)


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(pod: Obj) -> list[Obj]:
    """Every container that runs alongside the others: main ones and native sidecars."""
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*pod.get("containers", []), *sidecars]


def all_containers(pod: Obj) -> list[Obj]:
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """matchLabels only: the manifests use nothing else, and check_selectors says so."""
    match = (selector or {}).get("matchLabels", {})
    return all(labels.get(k) == v for k, v in match.items())


def selected(objects: list[Obj], selector: Obj | None) -> list[Obj]:
    return [w for w in workloads(objects) if selects(selector, pod_labels(w))]


def opens(container: Obj, port: int | str) -> bool:
    return any(port in (p.get("containerPort"), p.get("name")) for p in container.get("ports", []))


def pod_opens(pod: Obj, port: int | str) -> bool:
    return any(opens(c, port) for c in containers(pod))


def check_selectors(objects: list[Obj]) -> list[str]:
    """Only matchLabels is used (so the other checks see every selector whole)."""
    problems = []
    for obj in objects:
        for path, sel in _selectors(obj):
            if isinstance(sel, dict) and "matchExpressions" in sel:
                problems.append(f"{name(obj)} {path}: matchExpressions is not checked")
    return problems


def _selectors(obj: Obj) -> Iterator[tuple[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] in (*WORKLOADS, "PodDisruptionBudget"):
        yield "selector", spec.get("selector")
    if obj["kind"] == "NetworkPolicy":
        yield "podSelector", spec.get("podSelector")
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                yield "from.podSelector", peer.get("podSelector")


def check_services(objects: list[Obj]) -> list[str]:
    """Each Service selects pods, and each of its target ports is open on them."""
    problems = []
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"].get("selector")
        if not selector:
            problems.append(f"{name(svc)}: no selector")
            continue
        pods = selected(objects, {"matchLabels": selector})
        if not pods:
            problems.append(f"{name(svc)}: selects no pod template ({selector})")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for w in pods:
                if not pod_opens(pod_spec(w), target):
                    problems.append(f"{name(svc)}: targetPort {target} not open in {name(w)}")
    return problems


def _probes(container: Obj) -> Iterator[tuple[str, Obj]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def check_probes(objects: list[Obj]) -> list[str]:
    """Every running container has liveness and readiness probes, each on a port it opens."""
    problems = []
    for w in workloads(objects):
        for c in containers(pod_spec(w)):
            where = f"{name(w)} container {c['name']}"
            for needed in ("readinessProbe", "livenessProbe"):
                if needed not in c:
                    problems.append(f"{where}: no {needed}")
            for kind, probe in _probes(c):
                handlers = [h for h in ("grpc", "httpGet", "tcpSocket", "exec") if h in probe]
                if len(handlers) != 1:
                    problems.append(f"{where} {kind}: {len(handlers)} handlers {handlers}")
                for h in handlers:
                    port = probe[h].get("port") if h != "exec" else None
                    if port is not None and not opens(c, port):
                        problems.append(f"{where} {kind}: port {port} is not opened")
    return problems


def check_references(objects: list[Obj]) -> list[str]:
    """Each ConfigMap, Secret, PVC, ServiceAccount and governing Service a pod names exists."""
    problems = []
    for w in workloads(objects):
        pod = pod_spec(w)
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for ref_kind, ref_name, optional, key in _pod_refs(pod):
            target = find(objects, ref_kind, ref_name)
            if target is None:
                if not optional:
                    problems.append(f"{name(w)}: {ref_kind} {ref_name} does not exist")
            elif key is not None and key not in {
                **target.get("data", {}),
                **target.get("binaryData", {}),
            }:
                problems.append(f"{name(w)}: {ref_kind} {ref_name} has no key {key}")
        for c in all_containers(pod):
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in claims:
                    problems.append(f"{name(w)} {c['name']}: mounts unknown {mount['name']}")
        account = pod.get("serviceAccountName")
        if account and find(objects, "ServiceAccount", account) is None:
            problems.append(f"{name(w)}: ServiceAccount {account} does not exist")
        if w["kind"] == "StatefulSet":
            problems += _governing_service(objects, w)
    return problems


def _governing_service(objects: list[Obj], sts: Obj) -> list[str]:
    svc = find(objects, "Service", sts["spec"].get("serviceName", ""))
    if svc is None:
        return [f"{name(sts)}: serviceName {sts['spec'].get('serviceName')} does not exist"]
    problems = []
    if svc["spec"].get("clusterIP") != "None":
        problems.append(f"{name(sts)}: its Service {name(svc)} is not headless")
    if not selects({"matchLabels": svc["spec"].get("selector", {})}, pod_labels(sts)):
        problems.append(f"{name(sts)}: its Service {name(svc)} selects other pods")
    return problems


def _pod_refs(pod: Obj) -> Iterator[tuple[str, str, bool, str | None]]:
    """(kind, name, optional, key or None) of every object the pod spec names."""
    for v in pod.get("volumes", []):
        if "configMap" in v:
            cm = v["configMap"]
            for item in cm.get("items", [None]):
                yield "ConfigMap", cm["name"], cm.get("optional", False), item and item["key"]
        if "secret" in v:
            s = v["secret"]
            for item in s.get("items", [None]):
                yield "Secret", s["secretName"], s.get("optional", False), item and item["key"]
        if "persistentVolumeClaim" in v:
            yield "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], False, None
    for c in all_containers(pod):
        for source in c.get("envFrom", []):
            for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if field in source:
                    ref = source[field]
                    yield kind, ref["name"], ref.get("optional", False), None
        for env in c.get("env", []):
            value_from = env.get("valueFrom", {})
            for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if field in value_from:
                    ref = value_from[field]
                    yield kind, ref["name"], ref.get("optional", False), ref["key"]


IMAGE = re.compile(r"^(?P<repo>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$")


def image_tag(image: str) -> str | None:
    """The image's tag; None without one (a digest alone also counts as pinned: '@')."""
    if "@sha256:" in image:
        return "@"
    match = IMAGE.match(image)
    if match is None or "/" in (match.group("tag") or ""):
        return None
    return match.group("tag")


def check_images(objects: list[Obj]) -> list[str]:
    problems = []
    for w in workloads(objects):
        for c in all_containers(pod_spec(w)):
            tag = image_tag(c.get("image", ""))
            if tag in (None, "latest"):
                problems.append(f"{name(w)} {c['name']}: image {c.get('image')!r} has no tag")
    return problems


def check_resources(objects: list[Obj]) -> list[str]:
    """Requests (for scheduling and the CPU HPA) and limits (for neighbours) on every one."""
    problems = []
    for w in workloads(objects):
        for c in all_containers(pod_spec(w)):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in res.get(part, {}):
                        problems.append(f"{name(w)} {c['name']}: no {part}.{resource}")
    return problems


def check_security(objects: list[Obj]) -> list[str]:
    """Non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp,
    read-only root filesystem: from the container or, where allowed, the pod."""
    problems = []
    for w in workloads(objects):
        pod = pod_spec(w)
        pod_sc = pod.get("securityContext", {})
        for c in all_containers(pod):
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{name(w)} {c['name']}"
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser", 1) == 0:
                problems.append(f"{where}: may run as root")
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                problems.append(f"{where}: privilege escalation allowed")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities not dropped")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccomp is not RuntimeDefault")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
    return problems


def check_network_policies(objects: list[Obj]) -> list[str]:
    """Each policy selects pods, each same-namespace peer exists, each port is open."""
    problems = []
    for pol in (o for o in objects if o["kind"] == "NetworkPolicy"):
        targets = selected(objects, pol["spec"]["podSelector"])
        if not targets:
            problems.append(f"{name(pol)}: selects no pod")
        for rule in pol["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                same_namespace = "podSelector" in peer and "namespaceSelector" not in peer
                if same_namespace and not selected(objects, peer["podSelector"]):
                    problems.append(f"{name(pol)}: peer {peer['podSelector']} is no pod")
            for port in rule.get("ports", []):
                if not any(pod_opens(pod_spec(t), port["port"]) for t in targets):
                    problems.append(f"{name(pol)}: port {port['port']} open on no pod")
    return problems


def check_disruption_and_scaling(objects: list[Obj]) -> list[str]:
    """HPAs scale workloads that exist; PDBs select pods that exist."""
    problems = []
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if find(objects, ref["kind"], ref["name"]) is None:
            problems.append(f"{name(hpa)}: {ref['kind']} {ref['name']} does not exist")
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] == "Resource":
                target = find(objects, ref["kind"], ref["name"])
                resource = metric["resource"]["name"]
                for c in containers(pod_spec(target)) if target else []:
                    if resource not in c.get("resources", {}).get("requests", {}):
                        problems.append(f"{name(hpa)}: {c['name']} requests no {resource}")
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        if not selected(objects, pdb["spec"]["selector"]):
            problems.append(f"{name(pdb)}: selects no pod")
    return problems


def flag(args: list[str], flag_name: str) -> str | None:
    """The value of --flag_name=VALUE in a container's arguments."""
    prefix = f"--{flag_name}="
    return next((a[len(prefix) :] for a in args if a.startswith(prefix)), None)


def check_drain(objects: list[Obj]) -> list[str]:
    """Kubernetes waits for the drain: grace >= preStop sleep + --drain-grace-s + 10 s.

    Every container behind a Service sleeps in preStop, so the endpoint removal
    reaches the proxies before the server starts refusing."""
    problems = []
    for w in workloads(objects):
        pod = pod_spec(w)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod.get("containers", []):
            if not c.get("image", "").startswith("ghcr.io/shortline/shortline"):
                continue
            command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if not command or command[0] != "sleep":
                problems.append(f"{name(w)} {c['name']}: no preStop sleep")
                continue
            drain = float(flag(c.get("args", []), "drain-grace-s") or 0)
            if grace < float(command[1]) + drain + 10:
                problems.append(
                    f"{name(w)}: grace {grace} s < preStop {command[1]} + drain {drain} + 10"
                )
    return problems


CHECKS = (
    check_selectors,
    check_services,
    check_probes,
    check_references,
    check_images,
    check_resources,
    check_security,
    check_network_policies,
    check_disruption_and_scaling,
    check_drain,
)
