"""``shortline predictor {train,eval,serve}``: the predictor's commands.

Heavy imports (torch, transformers, grpc) happen inside each command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from shortline.common import config as shortline_config

HEAD_CHOICES = ("reg", "cls", "rank", "all")


def register(subparsers: Any) -> None:
    from services.predictor.config import PredictorConfig
    from services.predictor.heads import REPO_HEADS_DIR

    parser = subparsers.add_parser(
        "predictor", help="length predictor: train heads, evaluate them, serve them over gRPC"
    )
    sub = parser.add_subparsers(dest="predictor_command", metavar="SUBCOMMAND", required=True)

    train = sub.add_parser("train", help="train heads for one target model")
    train.add_argument("--target-model", required=True, help="e.g. Meta-Llama-3-8B-Instruct")
    train.add_argument("--head", choices=HEAD_CHOICES, default="all", help="head kind (all)")
    train.add_argument(
        "--from-log",
        type=Path,
        default=None,
        help="train from the scheduler's SQLite outcome log instead of alpaca_eval",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {REPO_HEADS_DIR}/<target> for alpaca_eval, "
        ".run/predictor/heads/<target> for --from-log)",
    )
    train.add_argument(
        "--finetune-top-layers",
        type=int,
        default=0,
        help="also train the top N encoder layers (slow; one head kind per run)",
    )
    train.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        help="train on a tuned encoder's frozen features (weights.npz of "
        "python -m services.predictor.distill)",
    )
    train.add_argument("--hidden", type=int, default=32, help="MLP hidden width (32)")
    train.add_argument("--seed", type=int, default=20261125, help="random seed")
    train.add_argument("--max-epochs", type=int, default=200, help="epoch cap (200)")
    train.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="held-out metrics of a target's heads against baselines")
    ev.add_argument("--target-model", required=True)
    ev.add_argument("--heads-dir", type=Path, default=REPO_HEADS_DIR)
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    ev.add_argument(
        "--backend",
        choices=("auto", "torch", "hybrid", "onnx", "onnx-int8"),
        default="auto",
        help="encoder backend (auto: onnx-int8 if onnxruntime is installed, as the service)",
    )
    ev.set_defaults(func=_eval)

    serve = sub.add_parser("serve", help="serve PredictorService over gRPC")
    shortline_config.add_arguments(serve, PredictorConfig, "predictor")
    serve.set_defaults(func=_serve)


def _train(args: argparse.Namespace) -> int:
    from services.predictor import sources
    from services.predictor.artifacts import train_target
    from services.predictor.heads import HEAD_KINDS, REPO_HEADS_DIR, HeadKindName
    from services.predictor.training import TrainOptions
    from shortline.common import paths

    target = args.target_model
    kinds: tuple[HeadKindName, ...] = HEAD_KINDS if args.head == "all" else (args.head,)
    if args.finetune_top_layers > 0 and len(kinds) > 1:
        print(
            "--finetune-top-layers trains one head kind per run: pass --head reg|cls|rank",
            file=sys.stderr,
        )
        return 2
    if args.encoder_weights is not None and not args.encoder_weights.is_file():
        print(f"error: --encoder-weights {args.encoder_weights} is not a file", file=sys.stderr)
        return 2
    try:
        if args.from_log is not None:
            data = sources.from_outcome_log(args.from_log, target)
            out = args.out or paths.run_dir() / "predictor" / "heads" / target
        else:
            data = sources.from_alpaca(target)
            out = args.out or REPO_HEADS_DIR / target
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = TrainOptions(hidden=args.hidden, seed=args.seed, max_epochs=args.max_epochs)
    command = "shortline " + shlex.join(sys.argv[1:])
    card = train_target(
        data,
        kinds,
        Path(out),
        options=options,
        finetune_top_layers=args.finetune_top_layers,
        encoder_weights=args.encoder_weights,
        threads=args.threads,
        progress=not args.no_progress,
        command=command,
    )
    keep = {h["file"] for h in card["heads"].values()}
    for stale in Path(out).glob("*.npz"):
        if stale.name not in keep:
            stale.unlink()
    summary = {
        k: {"version": h["version"], "val": h["val_metrics"], "test": h["test_metrics"]}
        for k, h in card["heads"].items()
    }
    print(json.dumps({"out": str(out), "default_head": card["default_head"], "heads": summary}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from services.predictor import sources
    from services.predictor.core import feature_extractor
    from services.predictor.encoder import Encoder, cached_features
    from services.predictor.evaluation import evaluate_split, format_table
    from services.predictor.heads import load_target

    folder = args.heads_dir / args.target_model
    if not (folder / "card.json").is_file():
        known = sorted(p.name for p in args.heads_dir.glob("*/card.json"))
        print(
            f"error: no heads for {args.target_model!r} in {args.heads_dir}; known: "
            + ", ".join(Path(k).parent.name for k in known),
            file=sys.stderr,
        )
        return 2
    target = load_target(folder)
    try:
        data = sources.from_alpaca(args.target_model)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if feature_extractor(target.card) != "minilm":
        features = _smol_split_features(target.card, data, args.split, args.threads)
        result = evaluate_split(data, features, target.heads, target.boundaries, args.split)
        result["default_head"] = target.default_head
        result["head_versions"] = {k: h.version for k, h in target.heads.items()}
        result["encoder_backend"] = feature_extractor(target.card)
        print(json.dumps(result, indent=2) if args.json else format_table(result))
        return 0
    encoder = Encoder(
        max_tokens=int(target.card["encoder"]["max_tokens"]),
        threads=args.threads,
        feature_layers=target.card["encoder"]["feature_layers"],
        backend=args.backend,
    )
    layers_file = target.card["encoder"].get("layers_file")
    if layers_file:
        encoder.load_tuned_layers(folder / layers_file)
    _, features = cached_features(encoder, data.instructions)
    result = evaluate_split(data, features, target.heads, target.boundaries, args.split)
    result["default_head"] = target.default_head
    result["head_versions"] = {k: h.version for k, h in target.heads.items()}
    result["encoder_backend"] = encoder.backend
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def _smol_split_features(card: dict[str, Any], data: Any, split: str, threads: int) -> Any:
    """SmolLM2 features as served (the card's backend, prefix reuse) of ``split``'s rows.

    Other rows stay zero: evaluation reads only the split's rows, and SmolLM2
    costs 25-70 ms per prompt, so the 805 instructions are not all encoded.
    """
    import numpy as np

    from services.predictor.smollm2_features import SmolLM2Features

    spec = card["features"]
    extractor = SmolLM2Features(
        spec["layers"],
        max_prompt_tokens=int(spec["max_prompt_tokens"]),
        threads=threads,
        backend=str(spec.get("backend", "torch")),
    )
    rows = data.indices(split)
    features = np.zeros((len(data.instructions), extractor.feature_dim), dtype=np.float32)
    features[rows] = extractor.encode_features([data.instructions[i] for i in rows])
    return features


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.predictor.config import PredictorConfig
    from services.predictor.service import serve_forever

    cfg = shortline_config.from_args(PredictorConfig, args, "predictor")
    asyncio.run(serve_forever(cfg))
    return 0
