"""Which extractor computes a head's input: the card's feature kind, mapped to a factory.

A card names its kind in ``features.extractor``; a card without that section is
a MiniLM card (the format predates it), ``minilm-tuned`` when its ``encoder``
section names a weights file. Each kind says which cards share one extractor
(``key``) and builds it (``build``). Every MiniLM-based extractor of a folder
shares the truncation and feature layers its cards' ``encoder`` sections set.

The stock MiniLM always loads: it gives every response its 384-d embedding.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.predictor.features.distilled import KIND as TUNED
from services.predictor.features.distilled import TunedKind
from services.predictor.features.embedding import KIND as EMBEDDING
from services.predictor.features.embedding import EmbeddingKind
from services.predictor.features.extractor import (
    BuildContext,
    Card,
    ExtractorSettings,
    FeatureExtractor,
    FeatureKind,
    MiniLMSettings,
)
from services.predictor.features.minilm import KIND as STOCK
from services.predictor.features.minilm import MiniLMFeatures, StockKind
from services.predictor.features.smollm2 import EXTRACTOR_NAME as SMOLLM2
from services.predictor.features.smollm2 import SmolLM2Kind

_STOCK_KIND = StockKind()
KINDS: dict[str, FeatureKind] = {
    STOCK: _STOCK_KIND,
    TUNED: TunedKind(),
    SMOLLM2: SmolLM2Kind(),
    # Heads retrained from a digest outcome log (embeddings only, no prompt text).
    EMBEDDING: EmbeddingKind(),
}


def kind_of(card: Card) -> str:
    """The card's feature kind: ``features.extractor``, else ``minilm`` or ``minilm-tuned``."""
    if "features" in card:
        return str(card["features"]["extractor"])
    return TUNED if card["encoder"].get("layers_file") else STOCK


@dataclass(frozen=True)
class CardRef:
    """A target's card and the folder its relative paths start from."""

    target_model: str
    card: Card
    folder: Path


@dataclass
class Extractors:
    of_target: dict[str, FeatureExtractor]
    embedder: MiniLMFeatures
    """The stock MiniLM: the sentence embedding of every response."""
    context: BuildContext = field(default_factory=BuildContext)
    built: dict[tuple[str, Hashable], FeatureExtractor] = field(default_factory=dict)
    """Every extractor built, by (kind, key): a head version loaded later shares them."""

    def for_card(self, ref: CardRef) -> FeatureExtractor:
        """The extractor of a card loaded after start (a new head version): an existing one
        when its kind and key match (the usual case: a retrained head on the same
        features), else built now with the settings of the start."""
        kind = _kind(ref)
        key = (kind_of(ref.card), kind.key(ref.card, ref.folder))
        found = self.built.get(key)
        if found is None:
            found = self.built[key] = kind.build(ref.card, ref.folder, self.context)
        return found

    @property
    def name(self) -> str:
        """What ListModels reports as the encoder: every distinct extractor, joined."""
        return " + ".join(sorted({e.name for e in self.of_target.values()}))

    def distinct(self) -> list[FeatureExtractor]:
        unique = {id(e): e for e in [self.embedder, *self.of_target.values()]}
        return list(unique.values())


def minilm_settings(cards: Mapping[str, Card]) -> MiniLMSettings:
    """Truncation (the largest) and layers (one set) of the cards' ``encoder`` sections."""
    sections = [c["encoder"] for c in cards.values() if "encoder" in c]
    layer_sets = {tuple(int(x) for x in s["feature_layers"]) for s in sections}
    if len(layer_sets) > 1:
        raise ValueError(
            f"heads of {sorted(cards)} disagree on encoder feature_layers: "
            f"{sorted(layer_sets)}; retrain them with one setting"
        )
    default = MiniLMSettings()
    return MiniLMSettings(
        max_tokens=max((int(s["max_tokens"]) for s in sections), default=default.max_tokens),
        feature_layers=layer_sets.pop() if layer_sets else default.feature_layers,
    )


def _kind(ref: CardRef) -> FeatureKind:
    name = kind_of(ref.card)
    if name not in KINDS:
        raise ValueError(
            f"{ref.target_model}: card.json features.extractor {name!r} is unknown "
            f"(known: {', '.join(sorted(KINDS))})"
        )
    return KINDS[name]


def build_extractors(refs: list[CardRef], settings: ExtractorSettings) -> Extractors:
    """One extractor per distinct key, built in target order after the stock MiniLM."""
    context = BuildContext(settings, minilm_settings({r.target_model: r.card for r in refs}))
    embedder = _STOCK_KIND.build({}, Path(), context)
    built: dict[tuple[str, Hashable], FeatureExtractor] = {
        (STOCK, _STOCK_KIND.key({}, Path())): embedder
    }
    of_target: dict[str, FeatureExtractor] = {}
    for ref in refs:
        kind = _kind(ref)
        key = (kind_of(ref.card), kind.key(ref.card, ref.folder))
        if key not in built:
            built[key] = kind.build(ref.card, ref.folder, context)
        of_target[ref.target_model] = built[key]
    return Extractors(of_target, embedder, context, built)


def build_one(ref: CardRef, settings: ExtractorSettings) -> FeatureExtractor:
    """The extractor of one target alone (no stock MiniLM unless the card needs it)."""
    context = BuildContext(settings, minilm_settings({ref.target_model: ref.card}))
    return _kind(ref).build(ref.card, ref.folder, context)
