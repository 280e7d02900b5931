"""The built wheel holds every shipped artifact, as a real install (the Dockerfile's
``pip install .``) sees it.

The tests run on the editable install, which reads heads straight from the
checkout, so a packaging rule that drops files never shows there: setuptools'
package finder once skipped every heads folder with a dot in its name
(``Mistral-7B-Instruct-v0.2``, ``claude-2.1``, ``vicuna-13b-v1.5``). This test
builds the wheel from a copy of what git tracks (plus the generated protobuf
code, as the image build has it) and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from shortline.common.paths import REPO_ROOT

# Everything under these folders that git tracks is shipped data.
ARTIFACT_ROOTS = ("services/predictor/artifacts",)


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", *args], cwd=REPO_ROOT, check=True, capture_output=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know what is tracked")
    src = tmp_path_factory.mktemp("src")
    generated = [str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob("shortline/*/v1/*_pb2*.py")]
    for rel in _git_files() + generated:
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, target)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(out)],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=600,
    )
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
    assert "shortline/scheduler/v1/scheduler_pb2.py" in wheel_names
    assert "shortline/py.typed" in wheel_names
