"""``shortline predictor {versions,canary,promote,rollback}``: one command per rollout step.

Each edits one target's manifest in the versions folder (``versions.py``)
atomically; every predictor watching the folder follows within its
``--versions-reload-s``, without a restart.

``promote`` is guarded: the version must beat the serving one on held-out recent
traffic. Its card's ``rollout.comparison`` (written by ``train --from-log``)
holds both versions' metrics on the log's newest requests; with
``--scheduler`` the scheduler's online accuracy (the live window, per head
version: a canary's requests beside the serving version's) must agree too.
"Beat" is Kendall's tau, the order shortest-job-first needs, higher by at least
``--min-tau-gain``. ``--force`` promotes anyway, with a warning, and the
history says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from services.predictor.config import default_versions_dir
from services.predictor.heads import SHIPPED_HEADS_DIR, load_all
from services.predictor.versions import (
    Manifest,
    ManifestError,
    is_version_name,
    manifest_path,
    read_manifest,
    version_dir,
    version_name,
    write_manifest,
)


class RolloutError(Exception):
    """A refusal: the message says why and what would do."""


def register(sub: Any) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--target-model", "--target", required=True, dest="target_model")
        parser.add_argument(
            "--versions-dir",
            type=Path,
            default=None,
            help="the predictor's --versions-dir (default $SHORTLINE_PREDICTOR_VERSIONS_DIR, else "
            "<run dir>/predictor/versions)",
        )
        parser.add_argument(
            "--heads-dir",
            type=Path,
            default=SHIPPED_HEADS_DIR,
            help="the predictor's --heads-dir: the base version of each target",
        )

    versions = sub.add_parser("versions", help="a target's versions: serving, canary, history")
    common(versions)
    versions.set_defaults(func=_versions)

    canary = sub.add_parser(
        "canary", help="put a version on trial (the scheduler sends it a share)"
    )
    common(canary)
    group = canary.add_mutually_exclusive_group(required=True)
    group.add_argument("--version", help="the version to try")
    group.add_argument("--clear", action="store_true", help="end the trial")
    canary.set_defaults(func=_canary)

    promote = sub.add_parser(
        "promote", help="serve a version, if it beats the serving one on recent traffic"
    )
    common(promote)
    promote.add_argument("--version", required=True)
    promote.add_argument(
        "--min-tau-gain",
        type=float,
        default=0.0,
        help="Kendall's tau must be higher than the serving version's by more than this (0)",
    )
    promote.add_argument(
        "--scheduler",
        default="",
        help="also require the scheduler's online accuracy (HOST:PORT, its public port) to "
        "show the version ahead on live traffic (it must have served as canary)",
    )
    promote.add_argument(
        "--min-requests",
        type=int,
        default=30,
        help="with --scheduler: finished requests each version needs in the window (30)",
    )
    promote.add_argument("--ca", default=None, help="with --scheduler: CA file (TLS)")
    promote.add_argument("--token-file", default=None, help="with --scheduler: bearer token")
    promote.add_argument("--force", action="store_true", help="promote without the checks")
    promote.set_defaults(func=_promote)

    rollback = sub.add_parser("rollback", help="serve the previous serving version again")
    common(rollback)
    rollback.set_defaults(func=_rollback)


def _dir(args: argparse.Namespace) -> Path:
    """``--versions-dir``, else the predictor's default (its own variable first)."""
    return Path(args.versions_dir or default_versions_dir())


def current(versions_dir: Path, heads_dir: Path, target: str) -> Manifest:
    """The target's manifest, or the implicit one of a target serving its base heads."""
    path = manifest_path(versions_dir, target)
    if path.is_file():
        return read_manifest(path)
    base = load_all(heads_dir).get(target)
    if base is None:
        return Manifest(target_model=target, serving="")
    return Manifest(target_model=target, serving=version_name(base.card))


def _card(versions_dir: Path, heads_dir: Path, target: str, version: str) -> dict[str, Any]:
    """The card of a version in the folder, or of the base heads when it names them."""
    if not is_version_name(version):
        raise RolloutError(f"{version!r} is not a version name (letters, digits, . _ -)")
    file = version_dir(versions_dir, target, version) / "card.json"
    if file.is_file():
        card: dict[str, Any] = json.loads(file.read_text())
        return card
    base = load_all(heads_dir).get(target)
    if base is not None and version_name(base.card) == version:
        return dict(base.card)
    raise RolloutError(f"{target} has no version {version!r} (no {file})")


def check_card(card: dict[str, Any], serving: str, min_gain: float) -> str:
    """Why the card's held-out comparison does not show it ahead of ``serving`` ("" if it does)."""
    comparison = card.get("rollout", {}).get("comparison")
    if not comparison:
        return "its card has no held-out comparison (train it with --from-log)"
    theirs = comparison.get("serving")
    if theirs is None:
        return "" if not serving else f"its comparison has no serving version ({serving} serves)"
    if theirs.get("version") != serving:
        return (
            f"it was compared with {theirs.get('version')}, but {serving} serves now "
            "(train again from the log, or use --scheduler)"
        )
    mine = comparison.get("candidate", {}).get("metrics", {}).get("kendall_tau")
    other = theirs.get("metrics", {}).get("kendall_tau")
    if mine is None or other is None:
        return "held-out tau unavailable: " + str(theirs.get("unavailable", "not measured"))
    if not mine > other + min_gain:
        return (
            f"held-out Kendall's tau {mine:.4f} does not beat the serving version's "
            f"({serving}) {other:.4f} (+{min_gain}) on the same {comparison.get('rows')} "
            "recent requests"
        )
    return ""


def check_online(args: argparse.Namespace, target: str, version: str, serving: str) -> str:
    """Why the scheduler's online accuracy does not show ``version`` ahead ("" if it does)."""
    import grpc

    from shortline.client import ClientConfigError, ClientOptions, ShortlineClient

    try:
        options = ClientOptions.from_files(
            args.scheduler, ca_file=args.ca, token_file=args.token_file, timeout_seconds=5
        )
        with ShortlineClient(options) as client:
            stats = client.stats()
    except (ClientConfigError, grpc.RpcError) as exc:
        return f"the scheduler's online accuracy is unreadable: {exc}"
    groups = {
        g.head: g
        for g in stats.accuracy
        if g.length_model == target and g.source == "predictor" and g.head in (version, serving)
    }
    for name in (version, serving):
        g = groups.get(name)
        if g is None or g.requests < args.min_requests:
            n = 0 if g is None else g.requests
            return (
                f"online: {name} has {n} finished requests in the scheduler's window "
                f"(need {args.min_requests}; set it as canary first)"
            )
    mine, other = groups[version].kendall_tau, groups[serving].kendall_tau
    if math.isnan(mine) or not mine > other + args.min_tau_gain:
        return (
            f"online Kendall's tau {mine:.4f} does not beat the serving version's "
            f"({serving}) {other:.4f} on the scheduler's live window"
        )
    return ""


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        message = func(args)
    except (RolloutError, ManifestError) as exc:
        print(f"shortline predictor {args.predictor_command}: refused: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0


def _versions(args: argparse.Namespace) -> int:
    def show(args: argparse.Namespace) -> str:
        m = current(_dir(args), args.heads_dir, args.target_model)
        return json.dumps(m.to_json(), indent=2)

    return _run(show, args)


def _canary(args: argparse.Namespace) -> int:
    def set_canary(args: argparse.Namespace) -> str:
        root, target = _dir(args), args.target_model
        m = current(root, args.heads_dir, target)
        if not m.serving:
            raise RolloutError(f"{target} serves nothing yet: promote a version first")
        if args.clear:
            write_manifest(root, m.changed("canary-clear", canary=""))
            return f"{target}: no canary (serving {m.serving})"
        _card(root, args.heads_dir, target, args.version)
        if args.version == m.serving:
            raise RolloutError(f"{args.version} is the serving version")
        write_manifest(root, m.changed("canary", canary=args.version))
        return f"{target}: canary {args.version} (serving {m.serving})"

    return _run(set_canary, args)


def _promote(args: argparse.Namespace) -> int:
    def promote(args: argparse.Namespace) -> str:
        root, target, version = _dir(args), args.target_model, args.version
        m = current(root, args.heads_dir, target)
        card = _card(root, args.heads_dir, target, version)
        if version == m.serving:
            raise RolloutError(f"{version} serves {target} already")
        reasons = [check_card(card, m.serving, args.min_tau_gain)]
        if args.scheduler and m.serving:
            reasons.append(check_online(args, target, version, m.serving))
        reasons = [r for r in reasons if r]
        if reasons and not args.force:
            raise RolloutError(
                f"{version} is not promoted for {target}: " + "; ".join(reasons) + " (--force "
                "promotes anyway)"
            )
        for r in reasons:
            print(f"warning: promoting with --force although {r}", file=sys.stderr)
        previous = (*m.previous, m.serving) if m.serving else m.previous
        canary = "" if m.canary == version else m.canary
        path = write_manifest(
            root,
            m.changed(
                "promote", serving=version, canary=canary, previous=previous, forced=bool(reasons)
            ),
        )
        return f"{target}: serving {version} (was {m.serving or 'nothing'}); {path}"

    return _run(promote, args)


def _rollback(args: argparse.Namespace) -> int:
    def rollback(args: argparse.Namespace) -> str:
        root, target = _dir(args), args.target_model
        path = manifest_path(root, target)
        if not path.is_file():
            raise RolloutError(f"{target} has no manifest in {root}: nothing to roll back")
        m = read_manifest(path)
        if not m.previous:
            raise RolloutError(f"{target} has no previous serving version")
        back = m.previous[-1]
        write_manifest(root, m.changed("rollback", serving=back, previous=m.previous[:-1]))
        return f"{target}: serving {back} again (was {m.serving})"

    return _run(rollback, args)
