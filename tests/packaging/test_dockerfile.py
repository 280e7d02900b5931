"""The image is built the way the repository builds itself, and runs as nobody special.

No Docker engine here: the Dockerfile is read as data. What is checked is what
made the old image go wrong or could: code generated a second way with other
flags, a root user, a moving base tag, build tools left in what ships.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from image_build import DOCKERFILE, Stage, make_commands, stages
from packaging.requirements import Requirement

from shortline.common.paths import REPO_ROOT

MAKEFILE = REPO_ROOT / "Makefile"
BUILD_TOOLS = ("make", "buf", "grpc_tools", "protoc", "codegen-tools", "gcc", "build-essential")


def runtime() -> Stage:
    return stages()[-1]


def makefile_recipe(target: str) -> list[str]:
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(.+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, name
    return match.group(1).strip()


def test_every_base_image_names_a_fixed_tag() -> None:
    for stage in stages():
        image, _, tag = stage.base.partition("@")[0].rpartition(":")
        assert image and tag and tag != "latest", f"FROM {stage.base}: name a tag, not latest"


def test_the_runtime_user_is_a_fixed_non_root_uid() -> None:
    (user,) = runtime().args("USER")[-1:]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {user}: numeric and not root"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {user}"
    created = " ".join(runtime().args("RUN"))
    assert f"--uid {uid}" in created, "the user is created with the UID that USER names"


def test_code_is_generated_once_in_the_build_stage_by_the_makefile_target() -> None:
    (build,) = [s for s in stages() if s.name == "build"]
    targets = [word for argv in make_commands(build) for word in argv[1:] if "=" not in word]
    assert targets.index("protos-generate") < targets.index("wheel"), targets
    # The developer's path (make protos) runs the same target, which is buf generate.
    assert "$(MAKE) protos-generate" in makefile_recipe("$(GEN_STAMP)")
    assert any(line.endswith("buf generate") for line in makefile_recipe("protos-generate"))
    for path in (DOCKERFILE, MAKEFILE):
        assert "grpc_tools.protoc" not in path.read_text(), f"{path.name}: a second codegen path"


def test_the_runtime_stage_installs_the_built_wheel_and_no_build_tools() -> None:
    stage = runtime()
    assert any(f"--from={s.name}" in c for s in stages()[:-1] for c in stage.args("COPY"))
    assert not [c for c in stage.args("COPY") if "--from=" not in c], "sources copied to runtime"
    runs = stage.args("RUN")
    assert any(re.search(r"pip install \S*shortline-\*\.whl", r) for r in runs), runs
    words = {w for r in runs for w in re.split(r"[\s;&|]+", r)}
    assert not words & set(BUILD_TOOLS), words & set(BUILD_TOOLS)


def test_the_generators_are_pinned_once_and_match_the_project_and_the_venv() -> None:
    pins = dict(p.split("==") for p in makefile_variable("CODEGEN_TOOLS").split())
    assert set(pins) >= {"buf-bin", "grpcio-tools", "mypy-protobuf"}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in map(Requirement, declared):
        if requirement.name in pins:
            assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins)
    for name, version in pins.items():
        assert metadata.version(name) == version, f"{name}: run `make setup`"


def test_the_build_context_leaves_out_local_state_and_generated_code() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "shortline/*/v1/*_pb2*.py", "shortline/*/v1/*_pb2*.pyi"} <= ignored
    assert "deploy/secrets" in ignored
