"""The image's wheel holds every shipped artifact and the generated protobuf code.

The tests run on the editable install, which reads heads straight from the
checkout, so a packaging rule that drops files never shows there: setuptools'
package finder once skipped every heads folder with a dot in its name
(``Mistral-7B-Instruct-v0.2``, ``claude-2.1``, ``vicuna-13b-v1.5``). This test
builds the wheel as the Dockerfile's build stage does, without Docker: it
copies what that stage COPYs (as git tracks it, so no local generated code),
runs the stage's ``make`` lines (buf generate, then pip wheel) and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from image_build import copied_sources, make_commands, stages

from shortline.common.paths import REPO_ROOT

# Everything under these folders that git tracks is shipped data.
ARTIFACT_ROOTS = ("services/predictor/artifacts",)


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", *args], cwd=REPO_ROOT, check=True, capture_output=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p]


def generated_modules() -> set[str]:
    """What buf generate makes of each .proto: message, gRPC and typing modules."""
    names = set()
    for proto in (REPO_ROOT / "protos").rglob("*.proto"):
        stem = str(proto.relative_to(REPO_ROOT / "protos"))[: -len(".proto")]
        names |= {
            f"{stem}_pb2.py",
            f"{stem}_pb2_grpc.py",
            f"{stem}_pb2.pyi",
            f"{stem}_pb2_grpc.pyi",
        }
    return names


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know what is tracked")
    (build,) = [s for s in stages() if s.name == "build"]
    src = tmp_path_factory.mktemp("src")
    # Tracked files and new ones not ignored: what a build context holds.
    for rel in _git_files("--cached", "--others", "--exclude-standard", *copied_sources(build)):
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, target)
    assert not list(src.rglob("*_pb2*.py")), "generated code is tracked by git"
    out = tmp_path_factory.mktemp("wheel")
    venv = Path(sys.executable).parent.parent
    commands = make_commands(build)
    # codegen-tools installs the pinned generators; this venv has them from
    # `make setup` (test_dockerfile.py checks the versions), so it is not rerun.
    for argv in (c for c in commands if "codegen-tools" not in c):
        done = subprocess.run(
            [*argv, f"VENV={venv}", f"WHEEL_DIR={out}"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("shortline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_every_tracked_head_and_card_is_in_the_wheel(wheel_names: set[str]) -> None:
    tracked = _git_files(*ARTIFACT_ROOTS)
    assert tracked, f"no artifacts tracked under {ARTIFACT_ROOTS}"
    cards = [p for p in tracked if p.endswith("card.json")]
    assert len(cards) >= 15, cards  # five targets in each of the three heads folders
    missing = sorted(p for p in tracked if p not in wheel_names)
    assert not missing, f"{len(missing)} shipped files missing from the wheel: {missing[:10]}"


def test_every_tracked_module_and_the_generated_code_are_in_the_wheel(
    wheel_names: set[str],
) -> None:
    modules = [p for p in _git_files("shortline", "services") if p.endswith(".py")]
    missing = sorted(p for p in modules if p not in wheel_names)
    assert not missing, missing[:10]
    assert "shortline/py.typed" in wheel_names


def test_the_wheel_has_the_code_generated_from_every_proto_and_nothing_stale(
    wheel_names: set[str],
) -> None:
    expected = generated_modules()
    assert "shortline/worker/v1/worker_pb2_grpc.py" in expected
    shipped = {n for n in wheel_names if "_pb2" in n}
    assert shipped == expected, (sorted(expected - shipped), sorted(shipped - expected))
