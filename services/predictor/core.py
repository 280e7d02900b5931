"""The predictor itself, with no gRPC in it: feature extractors + heads -> predicted tokens.

The gRPC service and the in-process ``offline`` API both call
:meth:`PredictorCore.predict_batch`, so a prediction is computed one way only.
Each target's card chooses its feature extractor through ``features.registry``;
the core only groups prompts by extractor. Everything is loaded at
construction, so the first request pays nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features.extractor import ExtractorSettings, FeatureExtractor
from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.registry import CardRef, build_extractors
from services.predictor.heads import SHIPPED_HEADS_DIR, TargetHeads, load_all

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


class PredictorCore:
    def __init__(
        self,
        heads_dir: Path = SHIPPED_HEADS_DIR,
        *,
        precision: str = "auto",
        threads: int | None = None,
        max_tokens: int | None = None,
        backend: str = "auto",
    ) -> None:
        self.targets: dict[str, TargetHeads] = load_all(heads_dir)
        if not self.targets:
            raise FileNotFoundError(f"no head artifacts (card.json) under {heads_dir}")
        settings = ExtractorSettings(
            precision=precision,
            threads=threads,
            backend=backend,
            max_tokens=max_tokens,
            batch_rows=MAX_PROMPTS,
        )
        refs = [CardRef(name, t.card, t.folder) for name, t in self.targets.items()]
        self.extractors = build_extractors(refs, settings)
        self.encoder_name = self.extractors.name

    @property
    def encoder(self) -> MiniLMEncoder:
        """The stock MiniLM (every response's embedding): its backend and precision."""
        return self.extractors.embedder.encoder

    def extractor_of(self, target_model: str) -> FeatureExtractor:
        return self.extractors.of_target[target_model]

    def warm_up(self) -> None:
        """The first forward of each model pays for lazy initialisation inside torch."""
        for extractor in self.extractors.distinct():
            extractor.warm_up()

    def known_targets(self) -> list[str]:
        return sorted(self.targets)

    def validate(self, query: Query) -> tuple[TargetHeads, str]:
        """Checks a query before any work; raises one of the errors above."""
        target = self.targets.get(query.target_model)
        if target is None:
            raise UnknownTargetError(
                f"target_model {query.target_model!r} has no trained head; "
                f"known: {', '.join(self.known_targets())}"
            )
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
        checked = [self.validate(q) for q in queries]
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(id(self.extractor_of(q.target_model)), []).append(i)
        embeddings: list[Any] = [None] * len(queries)
        features: list[Any] = [None] * len(queries)
        for members in groups.values():
            texts = [p for i in members for p in queries[i].prompts]
            batch = self.extractor_of(queries[members[0]].target_model).features(texts)
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
                )
            )
        return results

    def predict(self, query: Query) -> Result:
        return self.predict_batch([query])[0]
