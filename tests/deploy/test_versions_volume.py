"""The predictor's head versions folder in every deployment (docs/predictor.md): one
folder that every predictor replica reads and that outlives them, so one
``shortline predictor promote`` reaches every replica and a restarted one comes back
on the promoted version.

- Kubernetes: a ReadWriteMany claim, mounted read-only in every predictor at the
  path ``SHORTLINE_PREDICTOR_VERSIONS_DIR`` names (the rollout commands write from
  an operator pod that mounts it read-write);
- compose: a named volume under the predictor's versions folder;
- ``shortline up``: the predictor's ``--versions-dir`` is the folder the rollout
  commands default to.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from k8s_checks import ROOT, TARGETS, containers, find, pod_spec, render, workloads

from services.predictor.config import default_versions_dir
from shortline.stack_plan import StackConfig, plan

ENV = "SHORTLINE_PREDICTOR_VERSIONS_DIR"
Obj = dict[str, Any]


def predictors(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [
        (w, c)
        for w in workloads(objects)
        for c in containers(pod_spec(w))
        if c.get("args", [""])[:2] == ["predictor", "serve"]
    ]


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def under(path: str, mount: str) -> bool:
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return p == m or m in p.parents


@pytest.mark.parametrize("target", TARGETS)
def test_every_predictor_reads_its_versions_from_one_shared_claim(target: str) -> None:
    objects = render(target)
    found = predictors(objects)
    assert found, f"{target}: no predictor"
    for w, c in found:
        folder = env_of(c).get(ENV)
        assert folder, f"{w['metadata']['name']}: {ENV} is not set"
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        mounts = [m for m in c.get("volumeMounts", []) if under(folder, m["mountPath"])]
        # The deepest mount holding the folder is the one it lives on.
        mount = max(mounts, key=lambda m: len(m["mountPath"]), default=None)
        assert mount is not None, f"{target}: {folder} is on no volume (lost with the pod)"
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        assert claim, f"{target}: {folder} is on {mount['name']}, not a PersistentVolumeClaim"
        assert mount.get("readOnly") is True, "predictors only read versions"
        pvc = find(objects, "PersistentVolumeClaim", claim["claimName"])
        assert pvc is not None, claim["claimName"]
        replicas = w["spec"].get("replicas", 1)
        hpa = [
            o
            for o in objects
            if o["kind"] == "HorizontalPodAutoscaler"
            and o["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]
        ]
        if replicas > 1 or hpa:  # every replica, on any node, mounts the one claim
            assert "ReadWriteMany" in pvc["spec"]["accessModes"], pvc["spec"]


def test_the_compose_predictor_keeps_its_versions_on_a_named_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    predictor = compose["services"]["predictor"]
    folder = predictor["environment"][ENV]
    named = set(compose["volumes"])
    on = [
        v.split(":")[:2]
        for v in predictor.get("volumes", [])
        if isinstance(v, str) and under(folder, v.split(":")[1])
    ]
    assert on, f"{folder} is on no volume: a new container would lose every version"
    source, _ = max(on, key=lambda v: len(v[1]))
    assert source in named, f"{source} is not a named volume"
    # The image's run folder: the rollout commands' default inside the container.
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert "SHORTLINE_RUN_DIR=/var/lib/shortline" in dockerfile
    assert folder == "/var/lib/shortline/predictor/versions"


def test_shortline_up_gives_its_predictor_the_rollout_commands_default_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHORTLINE_RUN_DIR", str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    (child,) = [c for c in plan(StackConfig()) if c.name == "predictor"]
    argv = child.argv
    assert argv[argv.index("--versions-dir") + 1] == default_versions_dir()
    assert default_versions_dir().startswith(str(tmp_path))
    chosen = StackConfig(versions_dir=str(tmp_path / "v"), extra_predictor_args="--threads 1")
    (child,) = [c for c in plan(chosen) if c.name == "predictor"]
    assert child.argv[child.argv.index("--versions-dir") + 1] == str(tmp_path / "v")
    assert child.argv[-2:] == ["--threads", "1"]
    monkeypatch.setenv(ENV, str(tmp_path / "env"))  # the variable the commands honour too
    (child,) = [c for c in plan(StackConfig()) if c.name == "predictor"]
    assert child.argv[child.argv.index("--versions-dir") + 1] == str(tmp_path / "env")
