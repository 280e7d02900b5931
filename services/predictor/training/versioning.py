"""``shortline predictor train --from-log``: a new head version, judged beside the serving one.

The newest rows of the outcome log are held out (``sources.hold_out_recent``);
the heads are fitted on the older ones, written to a staging folder under the
versions folder, and renamed to ``<versions_dir>/<target>/<version>/`` once the
card is complete, so the predictor never sees half a version. The card gains a
``rollout`` section: the source log, the rows, the held-out window, and the
metrics of the new version and of the serving one on the same held-out
requests, measured the same way (bucket accuracy against the window's own
actual-length percentiles, as the scheduler's online accuracy does). Nothing is
served until ``shortline predictor canary`` or ``promote`` names the version.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features.extractor import ExtractorSettings
from services.predictor.features.registry import CardRef, build_one, kind_of
from services.predictor.heads import BUCKET_PERCENTILES, TargetHeads, load_all, load_target
from services.predictor.training.evaluation import evaluate
from services.predictor.training.sources import HeldOut, TrainingData
from services.predictor.versions import (
    ManifestError,
    manifest_path,
    read_manifest,
    version_dir,
    version_name,
)

STOCK = "minilm"
EMBEDDING = "minilm-embedding"


def serving_version(versions_dir: Path, heads_dir: Path, target: str) -> TargetHeads | None:
    """What serves ``target`` now: the manifest's version, else the base heads, else None."""
    path = manifest_path(versions_dir, target)
    if path.is_file():
        try:
            manifest = read_manifest(path)
        except ManifestError:
            manifest = None
        if manifest is not None:
            folder = version_dir(versions_dir, target, manifest.serving)
            if (folder / "card.json").is_file():
                return load_target(folder)
    base = load_all(heads_dir).get(target)
    if base is not None:
        return base
    return None


@functools.cache
def _encoder(threads: int | None) -> Any:
    """One stock MiniLM for both versions' held-out inputs (loading it takes seconds)."""
    from services.predictor.features.minilm import MiniLMEncoder

    return MiniLMEncoder(threads=threads)


def _inputs(
    version: TargetHeads, data: TrainingData, rows: np.ndarray, threads: int | None
) -> tuple[np.ndarray | None, str]:
    """The held-out rows as ``version``'s heads read them, or None and why not."""
    from services.predictor.training.feature_cache import cached_features

    kind = kind_of(version.card)
    texts = [data.instructions[i] for i in rows]
    has_text = not any(t.startswith("sha256:") for t in texts)
    if kind == EMBEDDING and data.embeddings is not None:
        stored = data.embeddings[rows]
        if np.isnan(stored).any():
            missing = np.flatnonzero(np.isnan(stored).any(axis=1))
            stored = stored.copy()
            stored[missing] = cached_features(_encoder(threads), [texts[i] for i in missing])[0]
        return stored, ""
    if not has_text:
        return None, f"its heads read {kind} features of the prompt text; the log kept digests"
    if kind in (STOCK, EMBEDDING):
        # The same encoder as training: the held-out features come from its cache.
        emb, feats = cached_features(_encoder(threads), texts)
        return (emb if kind == EMBEDDING else feats), ""
    extractor = build_one(
        CardRef(version.target_model, version.card, version.folder),
        # torch: no ONNX export for a one-off measurement (held-out tau within 0.005).
        ExtractorSettings(threads=threads, backend="torch"),
    )
    return extractor.features(texts).features, ""


def measure(
    version: TargetHeads, data: TrainingData, threads: int | None
) -> tuple[dict[str, Any], str]:
    """The version's default head on the held-out rows: metrics, or {} and why not."""
    rows = data.indices("test")
    inputs, why = _inputs(version, data, rows, threads)
    if inputs is None:
        return {}, why
    actual = data.tokens[rows]
    boundaries = [float(b) for b in np.percentile(actual, BUCKET_PERCENTILES)]
    predicted = version.heads[version.default_head].predict(inputs)["tokens"]
    return {k: round(float(v), 4) for k, v in evaluate(predicted, actual, boundaries).items()}, ""


def finish_version(
    staging: Path,
    card: dict[str, Any],
    data: TrainingData,
    held_out: HeldOut,
    source_log: Path,
    versions_dir: Path,
    heads_dir: Path,
    threads: int | None,
) -> tuple[Path, dict[str, Any]]:
    """Adds the ``rollout`` section to the staged card and moves it into place."""
    target = data.target_model
    candidate = load_target(staging)
    name = version_name(card)
    mine, why_not_mine = measure(candidate, data, threads)
    serving = serving_version(versions_dir, heads_dir, target)
    comparison: dict[str, Any] = {
        "rows": held_out.rows,
        "bucket_rule": "buckets at the held-out rows' own actual-length p25/p50/p75/p99 "
        "(as the scheduler's online accuracy)",
        "candidate": {"version": name, "head": candidate.default_head, "metrics": mine},
    }
    if why_not_mine:
        comparison["candidate"]["unavailable"] = why_not_mine
    if serving is None:
        comparison["serving"] = None
    else:
        theirs, why = measure(serving, data, threads)
        comparison["serving"] = {
            "version": version_name(serving.card),
            "head": serving.default_head,
            "metrics": theirs,
            **({"unavailable": why} if why else {}),
        }
    card["rollout"] = {
        "version": name,
        "source_log": str(source_log),
        "rows": {**data.sizes(), "repeat": held_out.repeats, "total": held_out.total},
        "held_out": {
            "rows": held_out.rows,
            "first_row": held_out.first + 1,
            "last_row": held_out.total,
            "rule": held_out.rule,
        },
        "comparison": comparison,
    }
    card["split"]["rule"] = held_out.rule
    card["split"]["used_for"] = (
        "train: fitting; val: early stopping and default head; test: the held-out newest rows"
    )
    (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    final = version_dir(versions_dir, target, name)
    if final.exists():
        shutil.rmtree(staging)
        raise FileExistsError(f"version {name} of {target} exists already: {final}")
    staging.rename(final)
    return final, card


def staging_dir(versions_dir: Path, target: str) -> Path:
    """A fresh folder beside the versions (same file system, so the final move is a rename);
    its leading dot keeps it out of any manifest's reach."""
    parent = versions_dir / target
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
