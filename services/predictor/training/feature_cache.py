"""Features of the training instructions, cached under ``run_dir()/predictor``.

Training several heads, re-running a target or distilling costs no encoder
time after the first run: MiniLM's features are keyed by the texts, the
truncation, the layers and the encoder's ``cache_tag`` (weights, precision,
backend); SmolLM2's by the texts and the feature recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from services.predictor.features import smollm2_onnx
from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.minilm_backends import EMBEDDING_DIM
from services.predictor.features.smollm2 import SmolLM2Features
from shortline.common import paths

log = logging.getLogger(__name__)


def cached_features(encoder: MiniLMEncoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and head features of ``texts`` (input order) from a cache under run_dir.

    The distinct texts are sorted before keying, so every alpaca_eval target
    (same 805 instructions, different row order) shares one cache file, and
    training several heads or re-running eval costs no encoder time.
    """
    unique = sorted(set(texts))
    emb, feats = _cached_unique(encoder, unique)
    where = {t: i for i, t in enumerate(unique)}
    rows = [where[t] for t in texts]
    return emb[rows], feats[rows]


def _cached_unique(encoder: MiniLMEncoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    layers = "".join(str(x) for x in encoder.feature_layers)
    key = f"{h.hexdigest()[:16]}-{encoder.max_tokens}-{encoder.cache_tag}-L{layers}"
    folder = paths.run_dir() / "predictor" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{key}.npz"
    if file.exists():
        with np.load(file) as data:
            emb, feats = data["embeddings"], data["features"]
        if emb.shape == (len(texts), EMBEDDING_DIM):
            return emb, feats
    start = time.perf_counter()
    emb, feats = encoder.encode_features(texts)
    log.info("encoded %d texts in %.1f s", len(texts), time.perf_counter() - start)
    tmp = folder / f"{key}.tmp{os.getpid()}.npz"
    np.savez(tmp, embeddings=emb, features=feats)
    tmp.replace(file)
    (folder / f"{key}.json").write_text(
        json.dumps({"n": len(texts), "max_tokens": encoder.max_tokens, "layers": layers})
    )
    return emb, feats


def training_features(
    instructions: list[str],
    layers: tuple[int, ...],
    max_prompt_tokens: int,
    threads: int,
    backend: str = "torch",
) -> np.ndarray:
    """Every instruction's training features (cached by their text and the recipe).

    ``torch``: fp32 full run (no prefix cache). ``onnx-int8``: the served features.
    """
    recipe: list[object] = [instructions, list(layers), max_prompt_tokens]
    if backend != "torch":
        recipe += [
            backend,
            smollm2_onnx.GRAPH_VERSION,
            smollm2_onnx.SMOOTHING_ALPHA,
            list(smollm2_onnx.CALIBRATION_PROMPTS),
        ]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    cache = paths.run_dir() / "predictor" / f"smollm2-features-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    if backend == "torch":
        extractor = SmolLM2Features(
            layers,
            max_prompt_tokens=max_prompt_tokens,
            precision="fp32",
            threads=threads,
            reuse_prefix=False,
        )
    else:
        extractor = SmolLM2Features(
            layers, max_prompt_tokens=max_prompt_tokens, threads=threads, backend=backend
        )
    features = extractor.encode_features(instructions)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features
