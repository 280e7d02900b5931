"""The one interface the core asks for a head's input, and what building one may use.

An extractor turns prompts into the rows a head reads. It may hand back the
384-d sentence embedding (all-MiniLM-L6-v2's, what responses carry) when it
computes it in the same pass; otherwise the core asks the stock MiniLM for it,
and only when a caller reads it.

    extractors = registry.build_extractors(targets, ExtractorSettings(threads=2))
    batch = extractors.of_target["Meta-Llama-3-8B-Instruct"].features(["Hi"])
    batch.features.shape  # (1, 1536)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.predictor.features.minilm_backends import DEFAULT_FEATURE_LAYERS, DEFAULT_MAX_TOKENS

Card = Mapping[str, Any]


@dataclass(frozen=True)
class ExtractorSettings:
    """How the process runs extractors (flags of ``predictor serve``), not what a card fixes."""

    precision: str = "auto"
    """torch precision: auto (bf16 where the CPU has it), bf16 or fp32."""
    threads: int | None = None
    """torch intra-op threads, or parallel ONNX runs (None: the library default)."""
    backend: str = "auto"
    """MiniLM's engine (``minilm_backends.BACKENDS``); SmolLM2's comes from its card."""
    max_tokens: int | None = None
    """MiniLM truncation for every card (None: the largest any MiniLM card names)."""
    batch_rows: int = 256
    """Rows per MiniLM forward pass (the core's prompt limit: one query, one chunk at most)."""


@dataclass(frozen=True)
class MiniLMSettings:
    """What every MiniLM-based extractor of one heads folder shares: truncation and layers.

    Read from the cards' ``encoder`` sections, which must agree on the layers.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    feature_layers: tuple[int, ...] = DEFAULT_FEATURE_LAYERS


@dataclass(frozen=True)
class BuildContext:
    settings: ExtractorSettings = field(default_factory=ExtractorSettings)
    minilm: MiniLMSettings = field(default_factory=MiniLMSettings)


@dataclass(frozen=True)
class FeatureBatch:
    features: np.ndarray
    """(n, dim) float32: the head's input, one row per prompt in input order."""
    embeddings: np.ndarray | None
    """(n, 384) unit sentence embeddings when computed in the same pass, else None."""


class FeatureExtractor(Protocol):
    @property
    def name(self) -> str:
        """How ListModels names what computes the features."""
        ...

    @property
    def backend(self) -> str:
        """The engine that computes the features (e.g. ``onnx-int8``), as eval reports it."""
        ...

    @property
    def feature_dim(self) -> int: ...

    def features(self, texts: Sequence[str]) -> FeatureBatch:
        """Thread-safe: the service's executor and offline callers may call it."""
        ...

    def warm_up(self) -> None:
        """The first forward pays for lazy initialisation inside torch; do it at start."""
        ...


class FeatureKind(Protocol):
    """One kind of features as the registry sees it: which cards share an extractor, and how
    to build one."""

    def key(self, card: Card, folder: Path) -> Hashable:
        """Cards with equal keys are served by one extractor instance."""
        ...

    def build(self, card: Card, folder: Path, context: BuildContext) -> FeatureExtractor: ...
