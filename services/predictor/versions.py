"""Head versions beside the shipped heads: a watched folder with one manifest per target.

Layout (``--versions-dir``, by default ``.run/predictor/versions``)::

    <versions_dir>/<target_model>/manifest.json      which version serves, which is on trial
    <versions_dir>/<target_model>/<version>/card.json the version's card and heads (*.npz)

A version is named by its default head's version (``rank-2026.12.05-1a2b3c4d``:
kind, date, hash of the weights), so the name a manifest gives, the name
``ListModels`` reports and ``PredictResponse.head_version`` are one string. The
shipped heads (``--heads-dir``) stay the base version of their targets: a
manifest may name a base version too, and a target without a manifest serves
its base.

Why a folder and not an admin RPC: every replica of the predictor (Kubernetes
pods sharing one volume, or one ConfigMap) sees the same files, so one
``promote`` reaches all of them, and a restarted replica comes back on the
promoted version. Each replica stats the manifests at most once per
``--versions-reload-s`` and reloads only when one changed; a manifest it cannot
read, or that names a version it cannot load, keeps what is in force and logs
a warning. Writers (``shortline predictor promote|rollback|canary``) replace a
manifest atomically (temp file, fsync, rename), so a reader sees the old or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
MAX_PREVIOUS = 20
MAX_HISTORY = 100
MAX_TARGETS = 64
MAX_MANIFEST_BYTES = 1 << 20
# A version's name is a folder name under its target: no separators, no leading dot
# (so never "." or ".."), bounded. Version names made here look like "rank-2026.12.05-1a2b".
VERSION_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or names nothing usable; the message says which."""


@dataclass(frozen=True)
class Manifest:
    """What one target serves. ``previous``: earlier serving versions, newest last (what
    ``rollback`` returns to); ``history``: every change, newest last (bounded)."""

    target_model: str
    serving: str
    canary: str = ""
    previous: tuple[str, ...] = ()
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "target_model": self.target_model,
            "serving": self.serving,
            "canary": self.canary,
            "previous": list(self.previous[-MAX_PREVIOUS:]),
            "history": list(self.history[-MAX_HISTORY:]),
        }

    def changed(
        self,
        action: str,
        *,
        serving: str | None = None,
        canary: str | None = None,
        previous: tuple[str, ...] | None = None,
        forced: bool = False,
    ) -> Manifest:
        """A copy with the given fields set and the change appended to the history."""
        entry: dict[str, Any] = {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "action": action,
            "serving": self.serving if serving is None else serving,
            "canary": self.canary if canary is None else canary,
        }
        if forced:
            entry["forced"] = True
        return replace(
            self,
            serving=entry["serving"],
            canary=entry["canary"],
            previous=(self.previous if previous is None else previous)[-MAX_PREVIOUS:],
            history=(*self.history, entry)[-MAX_HISTORY:],
        )


def manifest_path(versions_dir: Path, target_model: str) -> Path:
    return versions_dir / target_model / MANIFEST


def is_version_name(name: str) -> bool:
    return VERSION_NAME.fullmatch(name) is not None


def version_dir(versions_dir: Path, target_model: str, version: str) -> Path:
    """The version's folder; ValueError for a name that is not a plain folder name."""
    if not is_version_name(version):
        raise ValueError(f"{version!r} is not a version name ({VERSION_NAME.pattern})")
    return versions_dir / target_model / version


def version_name(card: dict[str, Any]) -> str:
    """A version's name: its default head's version (unique per weights)."""
    return str(card["heads"][card["default_head"]]["version"])


def read_manifest(path: Path) -> Manifest:
    """The manifest at ``path``; ManifestError naming the file and the fault."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: not a JSON object")
    serving = raw.get("serving")
    canary = raw.get("canary") or ""
    previous = raw.get("previous") or []
    history = raw.get("history") or []
    if not isinstance(serving, str) or not is_version_name(serving):
        raise ManifestError(f"{path}: 'serving' must name a version")
    if not isinstance(canary, str) or (canary and not is_version_name(canary)):
        raise ManifestError(f"{path}: 'canary' must be a version name or empty")
    if not isinstance(previous, list) or not all(
        isinstance(p, str) and is_version_name(p) for p in previous
    ):
        raise ManifestError(f"{path}: 'previous' must be a list of version names")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ManifestError(f"{path}: 'history' must be a list of objects")
    target = raw.get("target_model", path.parent.name)
    if target != path.parent.name:
        raise ManifestError(f"{path}: target_model {target!r} is not its folder's name")
    return Manifest(
        target_model=str(target),
        serving=serving,
        canary=canary,
        previous=tuple(previous[-MAX_PREVIOUS:]),
        history=tuple(history[-MAX_HISTORY:]),
    )


def write_manifest(versions_dir: Path, manifest: Manifest) -> Path:
    """Replaces the target's manifest atomically: a reader sees the old or the new one."""
    path = manifest_path(versions_dir, manifest.target_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest.to_json(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def manifests(versions_dir: Path) -> list[Path]:
    """The manifest files under ``versions_dir`` (at most MAX_TARGETS), sorted."""
    if not versions_dir.is_dir():
        return []
    found = sorted(p for p in versions_dir.glob(f"*/{MANIFEST}") if p.is_file())
    if len(found) > MAX_TARGETS:
        log.warning("versions dir %s: %d targets, reading the first %d", versions_dir,
                    len(found), MAX_TARGETS)  # fmt: skip
    return found[:MAX_TARGETS]


Signature = tuple[tuple[str, int, int, int], ...]


def signature(versions_dir: Path) -> Signature:
    """What changes when any manifest changes (path, inode, size, mtime): one stat each."""
    out = []
    for path in manifests(versions_dir):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
