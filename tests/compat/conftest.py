"""Fixtures of the version-skew test: the previous release as a source tree, and the
backends every combination shares (Triton with the replay model, the predictor).

The previous release is a ``git worktree`` of its tag outside the repository, with
its protobuf code generated there the way that release's Makefile did; it is removed
(and pruned) at the end of the session. Without the tag the test cannot say
anything: CI (``CI=true``) fails naming the fix, a local run skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat_procs import Backends, Release, start

from shortline.common.net import free_ports

REPO = Path(__file__).resolve().parents[2]
# The release this one must interoperate with; bumped at each release. The
# variable checks skew against any older tag (see docs/compatibility.md).
PREVIOUS_RELEASE = os.environ.get("SHORTLINE_PREVIOUS_RELEASE", "v0.1.0")
# The commit v0.1.0 tags: a clone that did not fetch tags still has it in main's
# history, so the test runs from it rather than skip or fail.
KNOWN_RELEASES = {"v0.1.0": "9958a567cb0da152b08546321dc7002d285d2fbb"}
# Fast replay steps keep the test short: 10 ms + 1 ms per sequence in the batch.
REPLAY_STEP_A_MS = "10"
REPLAY_STEP_B_MS = "1"
GIT_TIMEOUT_S = 120


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    argv = ["git", "-C", str(REPO), *args]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except OSError as exc:  # no git at all: the same answer as no tag
        return subprocess.CompletedProcess(argv, 127, "", f"git: {exc}")


def _missing_release(why: str) -> None:
    message = (
        f"the version-skew test needs the previous release, git tag {PREVIOUS_RELEASE}, "
        f"in {REPO}: {why}. Fetch it with `git fetch --tags origin` (a shallow clone "
        "needs the full history: `git fetch --unshallow --tags`, or actions/checkout "
        "with fetch-depth: 0)"
    )
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def current_release() -> Release:
    return Release("current", REPO)


@pytest.fixture(scope="session")
def previous_tag() -> str:
    """The tag, checked before anything starts."""
    found = _git("rev-parse", "--verify", "--quiet", f"{PREVIOUS_RELEASE}^{{commit}}")
    if found.returncode == 0:
        return PREVIOUS_RELEASE
    known = KNOWN_RELEASES.get(PREVIOUS_RELEASE)
    if known and _git("rev-parse", "--verify", "--quiet", f"{known}^{{commit}}").returncode == 0:
        return known
    git_says = found.stderr.strip()
    _missing_release("the tag is not in this clone" + (f" ({git_says})" if git_says else ""))
    return PREVIOUS_RELEASE


@pytest.fixture(scope="session")
def previous_release(
    previous_tag: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    """A worktree of the previous tag with its generated code, removed afterwards."""
    tree = tmp_path_factory.mktemp("previous-release") / PREVIOUS_RELEASE
    added = _git("worktree", "add", "--detach", str(tree), previous_tag)
    assert added.returncode == 0, f"git worktree add failed: {added.stderr}"
    try:
        # As that release's Makefile generated it (mypy stubs aside).
        protos = sorted(str(p.relative_to(tree)) for p in (tree / "protos").rglob("*.proto"))
        protoc = [
            sys.executable, "-m", "grpc_tools.protoc", "-I", "protos",
            "--python_out=.", "--grpc_python_out=.", *protos,
        ]  # fmt: skip
        generated = subprocess.run(
            protoc,
            cwd=tree,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
        assert generated.returncode == 0, f"protoc in {tree}: {generated.stderr}"
        yield Release(previous_tag, tree)
    finally:
        _git("worktree", "remove", "--force", str(tree))
        _git("worktree", "prune")


@pytest.fixture(scope="module")
def backends(
    previous_tag: str, current_release: Release, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backends]:
    """Started, not waited for: the worktree is made while they load (``wait_ready``)."""
    logs = tmp_path_factory.mktemp("backend-logs")
    grpc_port, http_port, predictor_port = free_ports(3)
    triton_args = [
        "triton", "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--models", "replay", "--replay-step-a-ms", REPLAY_STEP_A_MS,
        "--replay-step-b-ms", REPLAY_STEP_B_MS,
    ]  # fmt: skip
    triton = start("triton", current_release, triton_args, logs)
    predictor = start(
        "predictor", current_release, ["predictor", "serve", "--port", str(predictor_port)], logs
    )
    try:
        yield Backends(triton, f"127.0.0.1:{grpc_port}", predictor, f"127.0.0.1:{predictor_port}")
    finally:
        predictor.stop()
        triton.stop()
