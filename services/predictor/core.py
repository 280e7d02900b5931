"""The predictor itself, with no gRPC in it: encoder + heads -> predicted tokens.

The gRPC service and the in-process ``offline`` API both call
:meth:`PredictorCore.predict_batch`, so a prediction is computed one way only.
Everything is loaded at construction, so the first request pays nothing.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.encoder import DEFAULT_FEATURE_LAYERS, ENCODER_NAME, Encoder
from services.predictor.heads import REPO_HEADS_DIR, TargetHeads, load_all
from services.predictor.smollm2_features import EXTRACTOR_NAME as SMOLLM2
from services.predictor.smollm2_features import SmolLM2Features

log = logging.getLogger(__name__)

MAX_PROMPTS = 256


def feature_extractor(card: dict[str, Any]) -> str:
    """What computes a head's input: ``minilm`` (no ``features`` in the card) or SmolLM2."""
    return str(card.get("features", {}).get("extractor", "minilm"))


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
    # for targets served by a tuned encoder, whose own pooled vector is not it).
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
        heads_dir: Path = REPO_HEADS_DIR,
        *,
        precision: str = "auto",
        threads: int | None = None,
        max_tokens: int | None = None,
        backend: str = "auto",
    ) -> None:
        self.targets: dict[str, TargetHeads] = load_all(heads_dir)
        if not self.targets:
            raise FileNotFoundError(f"no head artifacts (card.json) under {heads_dir}")
        minilm = [t for t in self.targets.values() if feature_extractor(t.card) == "minilm"]
        lengths = {int(t.card["encoder"]["max_tokens"]) for t in minilm}
        layer_sets = {tuple(t.card["encoder"]["feature_layers"]) for t in minilm}
        if len(layer_sets) > 1:
            raise ValueError(
                f"heads under {heads_dir} disagree on encoder feature_layers: "
                f"{sorted(layer_sets)}; retrain them with one setting"
            )
        # MiniLM always loads: it gives every response its 384-d embedding.
        self.encoder = Encoder(
            max_tokens=max_tokens or max(lengths, default=256),
            precision=precision,
            threads=threads,
            backend=backend,
            feature_layers=layer_sets.pop() if layer_sets else DEFAULT_FEATURE_LAYERS,
        )
        # Targets whose card carries fine-tuned encoder layers get their own copy.
        self._encoders: dict[str, Encoder] = {}
        # Targets whose card names SmolLM2 features: one extractor per layer set.
        self._smol: dict[str, SmolLM2Features] = {}
        self._smol_of: dict[str, str] = {}
        for name, target in self.targets.items():
            extractor = feature_extractor(target.card)
            if extractor == "minilm":
                continue
            if extractor != SMOLLM2:
                raise ValueError(f"{name}: card.json features.extractor {extractor!r} is unknown")
            feats = target.card["features"]
            layers = tuple(int(x) for x in feats["layers"])
            # Cards without a backend predate onnx-int8: torch features, as trained.
            smol_backend = str(feats.get("backend", "torch"))
            key = (
                f"{SMOLLM2}:{','.join(map(str, layers))}:{int(feats['max_prompt_tokens'])}"
                f":{smol_backend}"
            )
            if key not in self._smol:
                self._smol[key] = SmolLM2Features(
                    layers,
                    max_prompt_tokens=int(feats["max_prompt_tokens"]),
                    precision=precision,
                    threads=threads,
                    backend=smol_backend,
                )
            self._smol_of[name] = key
        names = ([ENCODER_NAME] if minilm else []) + [
            f"{key.split(':')[0]} layers {key.split(':')[1]} {key.split(':')[3]}"
            for key in sorted(self._smol)
        ]
        self.encoder_name = " + ".join(names)
        tuned: dict[Path, Encoder] = {}
        for name, target in self.targets.items():
            if name in self._smol_of:
                continue
            layers_file = target.card["encoder"].get("layers_file")
            if layers_file:
                # Targets whose cards name one weights file share one tuned encoder.
                path = (heads_dir / name / layers_file).resolve()
                if path not in tuned:
                    tuned[path] = self._tuned_encoder(path)
                self._encoders[name] = tuned[path]

    def _tuned_encoder(self, path: Path) -> Encoder:
        tuned = copy.copy(self.encoder)
        tuned.model = copy.deepcopy(self.encoder.model)
        tuned._lock = threading.Lock()
        tuned.load_tuned_layers(path)
        return tuned

    def warm_up(self) -> None:
        """The first forward of each model pays for lazy initialisation inside torch."""
        self.encoder.encode(["warm up the encoder"])
        for extractor in self._smol.values():
            extractor.encode_features(["warm up the encoder"])

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
        """One encoder forward pass for all prompts of all queries (per encoder)."""
        checked = [self.validate(q) for q in queries]
        groups: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            if q.target_model in self._smol_of:
                key = self._smol_of[q.target_model]
            else:
                key = q.target_model if q.target_model in self._encoders else ""
            groups.setdefault(key, []).append(i)
        embeddings: list[Any] = [None] * len(queries)
        features: list[Any] = [None] * len(queries)
        for key, members in groups.items():
            texts = [p for i in members for p in queries[i].prompts]
            if key in self._smol:
                vectors = self.encoder.encode(texts, batch_size=MAX_PROMPTS)
                feats = self._smol[key].encode_features(texts)
            elif key:
                # A tuned encoder's pooled vector is not all-MiniLM-L6-v2's sentence
                # embedding (median cosine 0.73 for the distilled one): the embedding
                # comes from the stock encoder, and only when a caller asks for it.
                feats = self._encoders[key].encode_features(texts, batch_size=MAX_PROMPTS)[1]
                vectors = np.zeros((len(texts), 0), dtype=np.float32)
                if any(queries[i].embedding for i in members):
                    vectors = self.encoder.encode(texts, batch_size=MAX_PROMPTS)
            else:
                vectors, feats = self.encoder.encode_features(texts, batch_size=MAX_PROMPTS)
            offset = 0
            for i in members:
                n = len(queries[i].prompts)
                embeddings[i] = vectors[offset : offset + n]
                features[i] = feats[offset : offset + n]
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
