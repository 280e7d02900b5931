"""The contracts stay lint-clean and compatible with the last release, checked by buf.

Services are upgraded one at a time, so a scheduler of this commit must read
the bytes a v0.1.0 worker or client sends and the other way round. The
baseline is the image of v0.1.0's protos committed under protos/releases/ (a
clone without tags still has it); when the tag is there, a test checks that the
committed image is what the tag builds. Every check here is also shown to fail
on a copy of the protos that breaks it.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from tools import buf

from shortline.common.paths import REPO_ROOT
from shortline.worker.v1 import worker_pb2

RELEASE = "v0.1.0"
BASELINE = REPO_ROOT / "protos" / "releases" / f"{RELEASE}.binpb"
# The public API whose generated Python names SDK users import: held to FILE
# (buf.yaml holds everything to WIRE_JSON).
PUBLIC_FILES = ("shortline/scheduler/v1/scheduler.proto", "shortline/common/v1/common.proto")
FILE_CONFIG = json.dumps({"version": "v2", "breaking": {"use": ["FILE"]}})
# RPCs that share messages on purpose (buf.yaml, RPC_REQUEST_RESPONSE_UNIQUE).
SHARED = {
    f".shortline.scheduler.v1.{rpc}{kind}": {
        f"shortline.scheduler.v1.SchedulerService.{rpc}",
        f"shortline.scheduler.v1.SchedulerInternalService.{rpc}",
    }
    for rpc in ("RegisterWorker", "Heartbeat", "GetStats")
    for kind in ("Request", "Response")
}


def run_buf(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def build_image(workspace: Path, out: Path) -> Path:
    done = run_buf("build", "-o", str(out), cwd=workspace)
    assert done.returncode == 0, done.stderr
    return out


def breaking(workspace: Path, against: Path, tmp: Path) -> list[str]:
    """Findings of both checks (WIRE_JSON per buf.yaml, FILE on the public files)."""
    wire = run_buf("breaking", "--against", str(against), "--error-format", "json", cwd=workspace)
    image = build_image(workspace, tmp / "current.binpb")
    paths = [a for p in PUBLIC_FILES for a in ("--path", p)]
    source = run_buf(
        "breaking", str(image), "--against", str(against), "--config", FILE_CONFIG,
        "--error-format", "json", *paths, cwd=workspace,
    )  # fmt: skip
    findings = []
    for done in (wire, source):
        assert done.returncode in (0, 100), done.stderr
        findings += [line for line in done.stdout.splitlines() if line.strip()]
    return findings


def descriptors(image: Path) -> descriptor_pb2.FileDescriptorSet:
    # A buf image is a FileDescriptorSet with extra fields, which parsing skips.
    return descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())


def copy_workspace(tmp: Path) -> Path:
    workspace = tmp / "ws"
    shutil.copytree(
        REPO_ROOT / "protos", workspace / "protos", ignore=shutil.ignore_patterns("*.py")
    )
    shutil.copy2(REPO_ROOT / "buf.yaml", workspace / "buf.yaml")
    return workspace


def test_lint_is_clean() -> None:
    done = run_buf("lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_generated_code_carries_what_other_languages_need() -> None:
    """buf.gen.yaml's managed mode sets Go and Java packages for every file."""
    protos = sorted((REPO_ROOT / "protos").rglob("*.proto"))
    assert len(protos) >= 5
    for proto in protos:
        stem = proto.relative_to(REPO_ROOT / "protos").with_suffix("")
        module = importlib.import_module(".".join(stem.parts) + "_pb2")
        package = module.DESCRIPTOR.package  # e.g. shortline.worker.v1
        options = module.DESCRIPTOR.GetOptions()
        name, version = package.split(".")[-2:]
        assert options.go_package.endswith(f"/{stem.parent};{name}{version}"), options
        assert options.java_package == f"com.{package}", options
        assert options.java_multiple_files, options


def test_no_other_rpc_shares_its_messages(tmp_path: Path) -> None:
    """The lint exception in buf.yaml covers exactly the RPCs it names."""
    users: dict[str, set[str]] = defaultdict(set)
    for f in descriptors(build_image(REPO_ROOT, tmp_path / "img.binpb")).file:
        for service in f.service:
            for m in service.method:
                rpc = f"{f.package}.{service.name}.{m.name}"
                users[m.input_type].add(rpc)
                users[m.output_type].add(rpc)
    shared = {t: rpcs for t, rpcs in users.items() if len(rpcs) > 1}
    assert shared == SHARED


def test_no_breaking_change_since_the_release(tmp_path: Path) -> None:
    assert breaking(REPO_ROOT, BASELINE, tmp_path) == []


def test_the_committed_baseline_is_what_the_tag_builds(tmp_path: Path) -> None:
    tag = subprocess.run(
        ["git", "rev-parse", "-q", "--verify", f"refs/tags/{RELEASE}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if tag.returncode != 0:
        pytest.skip(f"no tag {RELEASE} in this clone: the committed image is the baseline")
    archive = subprocess.run(
        ["git", "archive", RELEASE, "protos"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    (tmp_path / "buf.yaml").write_text("version: v2\nmodules:\n  - path: protos\n")
    built = build_image(tmp_path, tmp_path / "tag.binpb")
    assert built.read_bytes() == BASELINE.read_bytes(), (
        f"protos/releases/{RELEASE}.binpb differs from the tag: rebuild it with "
        f"buf build '.git#tag={RELEASE},subdir=protos' -o {BASELINE.relative_to(REPO_ROOT)}"
    )


def split_problems(
    old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    """What differs from "Cancel and Preempt answer v0.1.0's StopResponse, renamed".

    buf.yaml's one breaking exception (RPC_SAME_RESPONSE_TYPE on worker.proto)
    leaves this to us: no other RPC may change its types, and both new messages
    must have StopResponse's fields (names, numbers, types, JSON names).
    """

    def methods(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, tuple[str, str]]:
        return {
            f"{f.package}.{s.name}.{m.name}": (m.input_type, m.output_type)
            for f in fds.file
            for s in f.service
            for m in s.method
        }

    def fields(fds: descriptor_pb2.FileDescriptorSet, name: str) -> list[tuple[object, ...]]:
        package, _, message = name.rpartition(".")
        (found,) = [m for f in fds.file if f.package == package for m in f.message_type
                    if m.name == message]  # fmt: skip
        return [
            (f.name, f.number, f.type, f.label, f.json_name, f.proto3_optional) for f in found.field
        ]

    problems = []
    before, after = methods(old), methods(new)
    changed = {rpc: after.get(rpc) for rpc in before if before[rpc] != after.get(rpc)}
    expected = {
        f"shortline.worker.v1.WorkerService.{rpc}": (
            f".shortline.worker.v1.{rpc}Request",
            f".shortline.worker.v1.{rpc}Response",
        )
        for rpc in ("Cancel", "Preempt")
    }
    if changed != expected:
        problems.append(f"RPC types changed since {RELEASE}: {changed}")
    stop = fields(old, "shortline.worker.v1.StopResponse")
    for name in ("shortline.worker.v1.CancelResponse", "shortline.worker.v1.PreemptResponse"):
        if fields(new, name) != stop:
            problems.append(f"{name} is not {RELEASE}'s StopResponse: {fields(new, name)}")
    return problems


def test_cancel_and_preempt_answer_v010_stop_response_on_the_wire(tmp_path: Path) -> None:
    old = descriptors(BASELINE)
    assert split_problems(old, descriptors(build_image(REPO_ROOT, tmp_path / "i.binpb"))) == []
    # And the generated classes read v0.1.0's bytes and JSON (a message class
    # built from the baseline image), both ways.
    pool = descriptor_pool.DescriptorPool()
    for f in old.file:
        pool.Add(f)
    stop = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("shortline.worker.v1.StopResponse")
    )
    fields = {"job_id": "j-1", "text": "héllo", "tokens": 7}
    old_message = json_format.ParseDict(fields, stop())
    for cls in (worker_pb2.CancelResponse, worker_pb2.PreemptResponse):
        sent = cls(job_id="j-1", text="héllo", tokens=7)
        received = stop.FromString(sent.SerializeToString())
        assert received == old_message
        assert json_format.MessageToDict(received) == json_format.MessageToDict(sent)
        assert cls.FromString(old_message.SerializeToString()) == sent


def test_a_renumbered_field_is_reported(tmp_path: Path) -> None:
    workspace = copy_workspace(tmp_path)
    proto = workspace / "protos/shortline/scheduler/v1/scheduler.proto"
    text = proto.read_text()
    assert "  uint32 max_tokens = 4;\n" in text
    proto.write_text(text.replace("  uint32 max_tokens = 4;\n", "  uint32 max_tokens = 40;\n", 1))
    findings = [json.loads(f) for f in breaking(workspace, BASELINE, tmp_path)]
    assert any(
        f["type"] == "FIELD_NO_DELETE" and '"max_tokens"' in f["message"] for f in findings
    ), findings


def test_a_changed_worker_response_is_caught_despite_the_exception(tmp_path: Path) -> None:
    """buf cannot see it (the new messages have no v0.1.0 twin); split_problems does."""
    workspace = copy_workspace(tmp_path)
    proto = workspace / "protos/shortline/worker/v1/worker.proto"
    text = proto.read_text()
    assert text.count("  uint32 tokens = 3;\n") >= 2
    proto.write_text(text.replace("  uint32 tokens = 3;\n", "  uint64 tokens = 3;\n"))
    assert breaking(workspace, BASELINE, tmp_path) == []
    changed = descriptors(build_image(workspace, tmp_path / "changed.binpb"))
    problems = split_problems(descriptors(BASELINE), changed)
    assert len(problems) == 2 and all("StopResponse" in p for p in problems), problems


def test_a_message_moved_out_of_the_public_file_is_reported(tmp_path: Path) -> None:
    """Same package and wire (WIRE_JSON passes) but a new Python module: FILE catches it."""
    workspace = copy_workspace(tmp_path)
    v1 = workspace / "protos/shortline/scheduler/v1"
    text = (v1 / "scheduler.proto").read_text()
    assert "message ListModelsRequest {}\n" in text
    text = text.replace("message ListModelsRequest {}\n", "")
    text = text.replace(
        'import "shortline/common/v1/common.proto";',
        'import "shortline/common/v1/common.proto";\nimport "shortline/scheduler/v1/models.proto";',
    )
    (v1 / "scheduler.proto").write_text(text)
    (v1 / "models.proto").write_text(
        'syntax = "proto3";\n\npackage shortline.scheduler.v1;\n\nmessage ListModelsRequest {}\n'
    )
    wire = run_buf("breaking", "--against", str(BASELINE), cwd=workspace)
    assert wire.returncode == 0, wire.stdout
    findings = breaking(workspace, BASELINE, tmp_path)
    assert any("ListModelsRequest" in f for f in findings), findings
