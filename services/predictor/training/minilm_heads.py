"""Training a target's heads on MiniLM features and writing them as a versioned artifact folder.

The folder holds one ``<kind>.npz`` per head and a ``card.json`` that says
what the heads are, what they were trained on, how the data was split, which
tokenizer counts the lengths, and how they scored on held-out instructions.
The service reads only this folder (never the training data).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features.embedding import KIND as EMBEDDING_FEATURE_KIND
from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.minilm_backends import (
    DEFAULT_FEATURE_LAYERS,
    DEFAULT_MAX_TOKENS,
    ENCODER_NAME,
)
from services.predictor.heads import (
    BUCKET_PERCENTILES,
    DISTRIBUTION_SECTION,
    HEAD_KIND_LONG,
    Head,
    HeadKindName,
)
from services.predictor.training import distribution
from services.predictor.training.buckets import bucket_boundaries, bucket_medians
from services.predictor.training.evaluation import evaluate, evaluate_split
from services.predictor.training.feature_cache import cached_features
from services.predictor.training.fit import TrainOptions, fit_head, fold_standardization
from services.predictor.training.sources import TrainingData
from shortline.common import dataset

log = logging.getLogger(__name__)

CARD_SCHEMA = 1
ENCODER_LAYERS_FILE = "encoder_top_layers.pt"
# Feature kind of heads fitted on the 384-d sentence embedding (a digest outcome log).
EMBEDDING_KIND = EMBEDDING_FEATURE_KIND


def head_version(kind: str, head: Head) -> str:
    """``<kind>-<date>-<hash of the weights>``: changes whenever the weights do."""
    buf = io.BytesIO()
    np.savez(buf, **head.arrays())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    return f"{kind}-{dt.date.today():%Y.%m.%d}-{digest}"


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()}


def train_target(
    data: TrainingData,
    kinds: Sequence[HeadKindName],
    out_dir: Path,
    *,
    options: TrainOptions = TrainOptions(),  # noqa: B008
    finetune_top_layers: int = 0,
    encoder_weights: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Fits ``kinds`` for ``data.target_model``, writes ``out_dir``, returns the card.

    ``encoder_weights``: a tuned encoder's weights (``distill.py``'s delta), kept frozen;
    the card points to the file by a path relative to ``out_dir``, so several targets
    share one copy.
    """
    import torch
    from tqdm import tqdm

    train_idx, val_idx, test_idx = (data.indices(s) for s in ("train", "val", "test"))
    if len(train_idx) < 10 or len(val_idx) < 2:
        raise ValueError(
            f"too little data for {data.target_model}: {len(train_idx)} train and "
            f"{len(val_idx)} val rows (need >= 10 and >= 2)"
        )
    boundaries = bucket_boundaries(data.tokens[train_idx])
    medians = bucket_medians(data.tokens[train_idx], boundaries)
    if encoder_weights is not None and finetune_top_layers > 0:
        raise ValueError("--encoder-weights and --finetune-top-layers do not combine")
    on_embeddings = data.embeddings is not None
    if on_embeddings and (encoder_weights is not None or finetune_top_layers > 0):
        raise ValueError(
            "heads fitted on logged embeddings take the stock encoder's sentence embedding: "
            "--encoder-weights and --finetune-top-layers do not apply (use --log-input text)"
        )
    start = time.perf_counter()
    encoder: MiniLMEncoder | None = None
    if on_embeddings:
        features_np = _embedding_inputs(data, threads)
    else:
        encoder = MiniLMEncoder(threads=threads, tuned_weights=encoder_weights)
        _, features_np = cached_features(encoder, data.instructions)
    embed_seconds = time.perf_counter() - start
    # Inputs are standardised with train statistics while training; the map is
    # folded into each head's first layer when it is saved.
    feat_mean = features_np[train_idx].mean(axis=0)
    feat_std = features_np[train_idx].std(axis=0) + 1e-6
    mean_t = torch.tensor(feat_mean)
    std_t = torch.tensor(feat_std)
    standardized = (torch.tensor(features_np) - mean_t) / std_t

    extra_params: list[Any] = []
    if finetune_top_layers > 0:
        assert encoder is not None
        layers = encoder.model.encoder.layer
        n = min(finetune_top_layers, len(layers))
        for p in encoder.model.parameters():
            p.requires_grad_(False)
        for layer in layers[len(layers) - n :]:
            for p in layer.parameters():
                p.requires_grad_(True)
                extra_params.append(p)

        def features(idx: np.ndarray, training: bool) -> Any:
            texts = [data.instructions[i] for i in idx]
            encoder.model.train(training)
            with torch.set_grad_enabled(training):
                return (encoder.forward(texts)[1] - mean_t) / std_t

    else:

        def features(idx: np.ndarray, training: bool) -> Any:
            return standardized[idx]

    out_dir.mkdir(parents=True, exist_ok=True)
    heads: dict[str, Head] = {}
    head_cards: dict[str, Any] = {}
    bar = tqdm(
        total=len(kinds) * options.max_epochs,
        desc=f"train {data.target_model}",
        unit="epoch",
        disable=not progress,
    )
    for kind in kinds:
        bar.set_postfix_str(kind)

        def on_epoch(epoch: int, loss: float, tau: float, kind: str = kind) -> None:
            bar.update(1)
            bar.set_postfix_str(f"{kind} loss={loss:.3f} val_tau={tau:.3f}")

        t0 = time.perf_counter()
        head, info, _ = fit_head(
            kind,
            features,
            features_np.shape[1],
            train_idx,
            data.tokens[train_idx],
            val_idx,
            data.tokens[val_idx],
            boundaries,
            medians,
            options,
            extra_params=extra_params,
            on_epoch=on_epoch,
        )
        bar.update(options.max_epochs - info["epochs_run"])
        if finetune_top_layers > 0:
            # Heads of a fine-tuned run see the tuned encoder's features.
            assert encoder is not None
            encoder.model.eval()
            features_np = encoder.encode_features(data.instructions)[1]
        fold_standardization(head, feat_mean, feat_std)
        head.version = head_version(kind, head)
        heads[kind] = head
        file = f"{kind}.npz"
        np.savez_compressed(out_dir / file, **head.arrays())
        val_pred = head.predict(features_np[val_idx])
        head_cards[kind] = {
            "kind": HEAD_KIND_LONG[kind],
            "version": head.version,
            "file": file,
            "architecture": (
                f"MLP {features_np.shape[1]} -> {options.hidden} "
                f"(ReLU, dropout {options.dropout}) -> {head.layers[-1][0].shape[1]}"
            ),
            "best_epoch": info["best_epoch"],
            "epochs_run": info["epochs_run"],
            "train_seconds": round(time.perf_counter() - t0, 2),
            "val_metrics": _round(
                evaluate(
                    val_pred["tokens"],
                    data.tokens[val_idx],
                    boundaries,
                    val_pred["bucket"] if kind == "cls" else None,
                )
            ),
        }
    bar.close()
    if finetune_top_layers > 0:
        assert encoder is not None
        torch.save(
            {
                k: v
                for k, v in encoder.model.state_dict().items()
                if any(
                    k.startswith(f"encoder.layer.{i}.")
                    for i in range(
                        len(encoder.model.encoder.layer) - finetune_top_layers,
                        len(encoder.model.encoder.layer),
                    )
                )
            },
            out_dir / ENCODER_LAYERS_FILE,
        )

    test = evaluate_split(data, features_np, heads, boundaries, "test") if len(test_idx) else None
    for name in heads:
        head_cards[name]["test_metrics"] = _round(test["heads"][name]) if test else {}
    default = max(heads, key=lambda k: head_cards[k]["val_metrics"]["kendall_tau"])
    train_tokens = data.tokens[train_idx]
    card: dict[str, Any] = {
        "schema": CARD_SCHEMA,
        "target_model": data.target_model,
        "version": f"{data.target_model}-{dt.date.today():%Y.%m.%d}-"
        + hashlib.sha256("".join(h["version"] for h in head_cards.values()).encode()).hexdigest()[
            :8
        ],
        "default_head": default,
        "default_head_rule": "best Kendall's tau on the val split",
        "encoder": _encoder_section(
            encoder, features_np.shape[1], finetune_top_layers, encoder_weights, out_dir
        ),
        **({"features": {"extractor": EMBEDDING_KIND}} if on_embeddings else {}),
        "tokenizer": dataset.TOKENIZER_NAME,
        "data_source": data.source,
        "split": {
            "rule": (
                f"by instruction text: blake2b keyed with {dataset.SPLIT_SEED!r}, "
                "value mod 100 -> train < 70 <= val < 80 <= test (same for every target)"
            ),
            "rows": data.sizes(),
            "instructions": {s: data.distinct(s) for s in ("train", "val", "test")},
            "used_for": "train: fitting; val: early stopping and default head; test: metrics",
        },
        "train_length_stats": {
            "mean": round(float(train_tokens.mean()), 2),
            "p50": round(float(np.median(train_tokens)), 2),
            "max": float(train_tokens.max()),
        },
        "bucket_percentiles": list(BUCKET_PERCENTILES),
        "bucket_boundaries": boundaries,
        "bucket_medians": medians,
        "cls_tokens_rule": "probability-weighted mean of the train medians of the 5 buckets",
        "rank_tokens_rule": "score's quantile among train scores -> same quantile of train lengths",
        "training": {
            "options": {k: getattr(options, k) for k in options.__dataclass_fields__},
            "embed_seconds": round(embed_seconds, 2),
            "command": command,
        },
        "heads": head_cards,
        "test_baselines": {k: _round(v) for k, v in test["baselines"].items()} if test else {},
    }
    if len(val_idx) >= distribution.MIN_VAL_ROWS:
        # Each head's length distribution (quantiles), fitted on this run's train and val
        # rows and judged on its test rows (for a version from the log: the newest ones).
        card[DISTRIBUTION_SECTION] = distribution.section(heads, features_np, data)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _embedding_inputs(data: TrainingData, threads: int | None) -> np.ndarray:
    """The heads' input when fitting on sentence embeddings: the logged ones, and for
    rows that kept only their text, the stock encoder's (loaded only for those)."""
    assert data.embeddings is not None
    inputs = data.embeddings.astype(np.float32, copy=True)
    missing = np.flatnonzero(np.isnan(inputs).any(axis=1))
    if len(missing):
        encoder = MiniLMEncoder(threads=threads)
        emb, _ = cached_features(encoder, [data.instructions[i] for i in missing])
        inputs[missing] = emb
    return inputs


def _encoder_section(
    encoder: MiniLMEncoder | None,
    input_dim: int,
    finetune_top_layers: int,
    encoder_weights: Path | None,
    out_dir: Path,
) -> dict[str, Any]:
    """The card's ``encoder`` section: what computes the heads' input."""
    if encoder is None:  # fitted on sentence embeddings
        return {
            "name": ENCODER_NAME,
            "pooling": "mean over tokens, L2-normalised (the 384-d embedding in responses)",
            # The folder's MiniLM settings must agree across cards; these heads read none
            # of the layers' features.
            "feature_layers": list(DEFAULT_FEATURE_LAYERS),
            "head_input": (
                f"the {input_dim}-d L2-normalised sentence embedding the predictor returns "
                "(logged by the scheduler in digest mode); standardisation folded into the "
                "first layer"
            ),
            "max_tokens": DEFAULT_MAX_TOKENS,
            "truncation": "[CLS] + head and tail of the prompt + [SEP]",
            "finetuned_top_layers": 0,
        }
    return {
        "name": ENCODER_NAME,
        "pooling": "mean over tokens, L2-normalised (the 384-d embedding in responses)",
        "feature_layers": list(encoder.feature_layers),
        "head_input": (
            "concatenated mean-pooled hidden states of feature_layers "
            f"({input_dim}-d; standardisation folded into the first layer)"
        ),
        "max_tokens": encoder.max_tokens,
        "truncation": "[CLS] + head and tail of the prompt + [SEP]",
        "finetuned_top_layers": finetune_top_layers,
        **({"layers_file": ENCODER_LAYERS_FILE} if finetune_top_layers else {}),
        **(
            {
                "layers_file": os.path.relpath(encoder_weights, out_dir),
                "weights_sha256": hashlib.sha256(encoder_weights.read_bytes()).hexdigest(),
            }
            if encoder_weights is not None
            else {}
        ),
    }
