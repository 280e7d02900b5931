"""The predictor itself, with no gRPC in it: feature extractors + heads -> predicted tokens.

The gRPC service and the in-process ``offline`` API both call
:meth:`PredictorCore.predict_batch`, so a prediction is computed one way only.
Each target's card chooses its feature extractor through ``features.registry``;
the core only groups prompts by extractor. Everything is loaded at
construction, so the first request pays nothing.

Versions: besides the heads folder (the base version of each target), the core
can follow a versions folder (``versions.py``): :meth:`PredictorCore.reload_versions`
re-reads its manifests when they change and swaps in, per target, the serving
version and an optional canary. A query may name a version
(``Query.version``); one the core does not hold gets the serving version, and
the result says which answered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features.extractor import ExtractorSettings, FeatureExtractor
from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.registry import CardRef, build_extractors
from services.predictor.heads import SHIPPED_HEADS_DIR, TargetHeads, load_all, load_target
from services.predictor.versions import (
    ManifestError,
    Signature,
    manifests,
    read_manifest,
    signature,
    version_dir,
    version_name,
)

log = logging.getLogger(__name__)

MAX_PROMPTS = 256


class UnknownTargetError(LookupError):
    """No head for this target model; the message lists the known ones."""


class UnknownHeadError(LookupError):
    """The target has no head of this kind; the message lists its heads."""


class BadPromptsError(ValueError):
    """The prompt list is empty, too long, or holds an empty prompt."""


@dataclass(frozen=True)
class Query:
    target_model: str
    prompts: Sequence[str]
    head: str | None = None
    # Whether the caller reads the sentence embedding (costs a second MiniLM pass
    # for targets whose extractor does not compute it, e.g. a tuned encoder's).
    embedding: bool = True
    version: str = ""
    """A head version the core holds (the serving or canary one); empty: serving."""


@dataclass(frozen=True)
class Route:
    """One target's versions in force: the serving one, and an optional canary."""

    serving: TargetHeads
    canary: TargetHeads | None = None
    held: Mapping[str, TargetHeads] = field(default_factory=dict)
    """Version name -> heads, for a query naming a version."""

    @staticmethod
    def of(serving: TargetHeads, canary: TargetHeads | None = None) -> Route:
        held = {version_name(serving.card): serving}
        if canary is not None:
            held[version_name(canary.card)] = canary
        return Route(serving, canary, held)

    @property
    def serving_version(self) -> str:
        return version_name(self.serving.card)

    @property
    def canary_version(self) -> str:
        return "" if self.canary is None else version_name(self.canary.card)


@dataclass
class Result:
    target_model: str
    head: str
    head_version: str
    bucket_boundaries: list[float]
    tokens: np.ndarray
    score: np.ndarray
    bucket: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    quantiles: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """(prompts, levels) output tokens at ``quantile_levels``; (prompts, 0) when the
    head's card has no distribution."""
    quantile_levels: tuple[float, ...] = ()
    """The levels of ``quantiles``' columns (``QUANTILE_LEVELS``); empty when it has none."""


class PredictorCore:
    def __init__(
        self,
        heads_dir: Path = SHIPPED_HEADS_DIR,
        *,
        precision: str = "auto",
        threads: int | None = None,
        max_tokens: int | None = None,
        backend: str = "auto",
        versions_dir: Path | None = None,
    ) -> None:
        self.base: dict[str, TargetHeads] = load_all(heads_dir)
        self.versions_dir = versions_dir
        if not self.base and not (versions_dir is not None and manifests(versions_dir)):
            raise FileNotFoundError(f"no head artifacts (card.json) under {heads_dir}")
        settings = ExtractorSettings(
            precision=precision,
            threads=threads,
            backend=backend,
            max_tokens=max_tokens,
            batch_rows=MAX_PROMPTS,
        )
        refs = [CardRef(name, t.card, t.folder) for name, t in self.base.items()]
        self.extractors = build_extractors(refs, settings)
        self.encoder_name = self.extractors.name
        # Each loaded version's extractor, by its folder (versions share extractors).
        self._extractor: dict[Path, FeatureExtractor] = {
            t.folder: self.extractors.of_target[name] for name, t in self.base.items()
        }
        self._routes: dict[str, Route] = {n: Route.of(t) for n, t in self.base.items()}
        self.targets: dict[str, TargetHeads] = dict(self.base)
        """Each target's serving version (replaced whole on a reload, never mutated)."""
        self._signature: Signature | None = None
        self.reloads = 0
        self.reload_errors = 0
        if versions_dir is not None:
            self.reload_versions()

    def route(self, target_model: str) -> Route | None:
        return self._routes.get(target_model)

    def reload_versions(self) -> bool:
        """Re-reads the versions folder if a manifest changed; True when it did.

        Called off the event loop (loading a version reads its files and may build
        an extractor). Each target is read alone: a bad manifest, or one naming a
        version that does not load, keeps that target's versions in force (a
        warning), the others change. The routes are swapped in one assignment, so
        a concurrent prediction sees the old set or the new one.
        """
        if self.versions_dir is None:
            return False
        sig = signature(self.versions_dir)
        if sig == self._signature:
            return False
        self._signature = sig
        routes = {n: Route.of(t) for n, t in self.base.items()}
        for path in manifests(self.versions_dir):
            target = path.parent.name
            try:
                manifest = read_manifest(path)
                serving = self._load(target, manifest.serving)
                canary = self._load(target, manifest.canary) if manifest.canary else None
            except (ManifestError, OSError, ValueError, KeyError) as exc:
                self.reload_errors += 1
                kept = self._routes.get(target)
                log.warning(
                    "versions of %s unchanged (%s): %s",
                    target,
                    f"serving {kept.serving_version}" if kept else "not served",
                    exc,
                )
                if kept is not None:
                    routes[target] = kept
                continue
            routes[target] = Route.of(serving, canary)
        changed = {n: (r.serving_version, r.canary_version) for n, r in routes.items()} != {
            n: (r.serving_version, r.canary_version) for n, r in self._routes.items()
        }
        self._routes = routes
        self.targets = {n: r.serving for n, r in routes.items()}
        # The base versions' extractors stay: a rollback may name them again.
        in_force = {t.folder for r in routes.values() for t in r.held.values()}
        in_force |= {t.folder for t in self.base.values()}
        self._extractor = {f: e for f, e in self._extractor.items() if f in in_force}
        if changed:
            self.reloads += 1
            log.info(
                "head versions: %s",
                "; ".join(
                    f"{n} serving {r.serving_version}"
                    + (f", canary {r.canary_version}" if r.canary else "")
                    for n, r in sorted(routes.items())
                ),
            )
        return changed

    def _load(self, target: str, version: str) -> TargetHeads:
        """A version of ``target``: its base (shipped) heads, one already held, or its folder."""
        base = self.base.get(target)
        if base is not None and version_name(base.card) == version:
            return base
        current = self._routes.get(target)
        if current is not None and version in current.held:
            return current.held[version]
        assert self.versions_dir is not None
        folder = version_dir(self.versions_dir, target, version)
        if not (folder / "card.json").is_file():
            raise ManifestError(f"version {version!r} of {target}: no {folder}/card.json")
        heads = load_target(folder)
        if heads.target_model != target or version_name(heads.card) != version:
            raise ManifestError(
                f"{folder}/card.json is {heads.target_model} {version_name(heads.card)}, "
                f"not {target} {version}"
            )
        self._extractor[folder] = self.extractors.for_card(CardRef(target, heads.card, folder))
        return heads

    @property
    def encoder(self) -> MiniLMEncoder:
        """The stock MiniLM (every response's embedding): its backend and precision."""
        return self.extractors.embedder.encoder

    def extractor_of(self, target_model: str) -> FeatureExtractor:
        """The extractor of the target's serving version."""
        return self._extractor[self.targets[target_model].folder]

    def warm_up(self) -> None:
        """The first forward of each model pays for lazy initialisation inside torch."""
        unique = {id(e): e for e in [*self.extractors.distinct(), *self._extractor.values()]}
        for extractor in unique.values():
            extractor.warm_up()

    def known_targets(self) -> list[str]:
        return sorted(self._routes)

    def validate(self, query: Query) -> tuple[TargetHeads, str]:
        """Checks a query before any work; raises one of the errors above."""
        route = self._routes.get(query.target_model)
        if route is None:
            raise UnknownTargetError(
                f"target_model {query.target_model!r} has no trained head; "
                f"known: {', '.join(self.known_targets())}"
            )
        target = route.held.get(query.version, route.serving) if query.version else route.serving
        head = query.head or target.default_head
        if head not in target.heads:
            raise UnknownHeadError(
                f"head {head!r} is not trained for {query.target_model}; "
                f"available: {', '.join(sorted(target.heads))}"
            )
        n = len(query.prompts)
        if n == 0:
            raise BadPromptsError("prompts must hold 1..256 prompts, got none")
        if n > MAX_PROMPTS:
            raise BadPromptsError(f"prompts must hold at most {MAX_PROMPTS} prompts, got {n}")
        for i, p in enumerate(query.prompts):
            if not p or not p.strip():
                raise BadPromptsError(f"prompts[{i}] is empty")
        return target, head

    def predict_batch(self, queries: Sequence[Query]) -> list[Result]:
        """One forward pass per feature extractor for all prompts of all queries."""
        # Taken before the routes: a reload adds a version's extractor to this dict
        # before it swaps the routes in, and prunes only into a new dict.
        extractor = self._extractor
        checked = [self.validate(q) for q in queries]
        of_query = [extractor[target.folder] for target, _ in checked]
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(of_query):
            groups.setdefault(id(e), []).append(i)
        embeddings: list[Any] = [None] * len(queries)
        features: list[Any] = [None] * len(queries)
        for members in groups.values():
            texts = [p for i in members for p in queries[i].prompts]
            batch = of_query[members[0]].features(texts)
            vectors = batch.embeddings
            if vectors is None:
                # The sentence embedding comes from the stock encoder, and only when a
                # caller asks for it (the simulator and a scheduler without a cache do not).
                vectors = np.zeros((len(texts), 0), dtype=np.float32)
                if any(queries[i].embedding for i in members):
                    vectors = self.extractors.embedder.embed(texts)
            offset = 0
            for i in members:
                n = len(queries[i].prompts)
                embeddings[i] = vectors[offset : offset + n]
                features[i] = batch.features[offset : offset + n]
                offset += n
        results = []
        for q, (target, head_name), emb, feat in zip(
            queries, checked, embeddings, features, strict=True
        ):
            head = target.heads[head_name]
            out = head.predict(feat)
            results.append(
                Result(
                    target_model=q.target_model,
                    head=head_name,
                    head_version=head.version,
                    bucket_boundaries=target.boundaries,
                    tokens=out["tokens"],
                    score=out["score"],
                    bucket=out["bucket"],
                    probs=out["probs"],
                    embeddings=emb,
                    quantiles=out["quantiles"],
                    quantile_levels=head.distribution.levels if head.distribution else (),
                )
            )
        return results

    def predict(self, query: Query) -> Result:
        return self.predict_batch([query])[0]
