"""``shortline predictor train`` and ``shortline predictor eval``: training's commands.

Registered under ``shortline predictor`` by ``services/predictor/cli.py``.
Heavy imports (torch, transformers) happen inside each command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from services.predictor.features.minilm_backends import BACKENDS
from services.predictor.heads import DISTILLED_HEADS_DIR, SHIPPED_HEADS_DIR, STOCK_HEADS_DIR
from services.predictor.training.sources import LOG_INPUTS

HEAD_CHOICES = ("reg", "cls", "rank", "all")


def register(sub: Any) -> None:
    """Adds ``train`` and ``eval`` to the ``shortline predictor`` subparsers."""
    train = sub.add_parser("train", help="train heads for one target model")
    train.add_argument(
        "--target-model", "--target", required=True, help="e.g. Meta-Llama-3-8B-Instruct"
    )
    train.add_argument("--head", choices=HEAD_CHOICES, default="all", help="head kind (all)")
    train.add_argument(
        "--from-log",
        type=Path,
        default=None,
        help="train from the scheduler's SQLite outcome log instead of alpaca_eval: its "
        "finished (stop, length) rows whose length_model is --target-model. Rows with the "
        "prompt's text (--outcome-log-prompts text) train as alpaca_eval does. Digest rows "
        "(--outcome-log-prompts digest) keep no text: they train only through the 384-d "
        "all-MiniLM-L6-v2 embedding the predictor returned, so the scheduler must have had "
        "a --predictor with the stock encoder; rows without text or embedding (no predictor, "
        "or it failed) are skipped and counted",
    )
    train.add_argument(
        "--log-input",
        choices=LOG_INPUTS,
        default="auto",
        help="with --from-log: fit the heads on the text's multi-layer features (text: "
        "digest rows skipped), or on the sentence embedding (embedding: stored for digest "
        "rows, computed for text rows; such heads have feature kind minilm-embedding and "
        "take no --encoder-weights or --finetune-top-layers); auto: text unless some "
        "usable row has no text (auto)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default {STOCK_HEADS_DIR}/<target> for alpaca_eval, "
        f"{DISTILLED_HEADS_DIR}/<target> with --encoder-weights); with "
        "--from-log, writing here instead of a new version in --versions-dir also splits the "
        "log's rows by prompt, not by time",
    )
    train.add_argument(
        "--versions-dir",
        type=Path,
        default=None,
        help="with --from-log: write the new head version to <dir>/<target>/<version>/, with "
        "its metrics and the serving version's on the log's newest rows (default: the "
        "predictor's --versions-dir default, <run dir>/predictor/versions)",
    )
    train.add_argument(
        "--heads-dir",
        type=Path,
        default=SHIPPED_HEADS_DIR,
        help="with --from-log: the base heads the predictor serves when no manifest names a "
        "version (what the new version is compared with)",
    )
    train.add_argument(
        "--holdout-share",
        type=float,
        default=0.2,
        help="with --from-log: share of the newest rows held out for comparison (0.2)",
    )
    train.add_argument(
        "--newest",
        type=int,
        default=0,
        help="with --from-log: use only the log's newest N usable rows (0: all). After a "
        "drift, the rows from before it teach the old lengths: train on what came since",
    )
    train.add_argument(
        "--holdout-min",
        type=int,
        default=50,
        help="with --from-log: held-out rows at least (50; the share wins when larger)",
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
        "python -m services.predictor.training.distill)",
    )
    train.add_argument("--hidden", type=int, default=32, help="MLP hidden width (32)")
    train.add_argument("--seed", type=int, default=20261125, help="random seed")
    train.add_argument("--max-epochs", type=int, default=200, help="epoch cap (200)")
    train.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="held-out metrics of a target's heads against baselines")
    ev.add_argument("--target-model", required=True)
    ev.add_argument("--heads-dir", type=Path, default=SHIPPED_HEADS_DIR)
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    ev.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="encoder backend (auto: onnx-int8 if onnxruntime is installed, as the service)",
    )
    ev.set_defaults(func=_eval)

    cal = sub.add_parser(
        "calibrate",
        help="fit each head's length distribution (quantiles) on the val split and report "
        "held-out log-likelihood and calibration of every candidate; --write stores it in "
        "the card",
    )
    cal.add_argument(
        "--target-model", action="append", default=None, help="repeatable (default: every card)"
    )
    cal.add_argument("--heads-dir", type=Path, default=SHIPPED_HEADS_DIR)
    cal.add_argument(
        "--write",
        action="store_true",
        help="write the chosen family's section into each card.json (versions and weights "
        "unchanged)",
    )
    cal.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    cal.add_argument("--backend", choices=BACKENDS, default="auto", help="as the service (auto)")
    cal.set_defaults(func=_calibrate)


def _train(args: argparse.Namespace) -> int:
    from services.predictor.heads import HEAD_KINDS, HeadKindName
    from services.predictor.training import sources
    from services.predictor.training.fit import TrainOptions
    from services.predictor.training.minilm_heads import train_target

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
    versioned = args.from_log is not None and args.out is None
    try:
        if versioned:
            return _train_version(args, kinds)
        if args.from_log is not None:
            data = sources.newest(
                sources.from_outcome_log(args.from_log, target, args.log_input), args.newest
            )
            out = args.out
            print(f"training from {data.source}", file=sys.stderr)
        else:
            data = sources.from_alpaca(target)
            # Stock-MiniLM heads go beside the stock ones, never into the default
            # (distilled) folder, whose heads read the tuned encoder's features.
            default_dir = DISTILLED_HEADS_DIR if args.encoder_weights else STOCK_HEADS_DIR
            out = args.out or default_dir / target
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
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keep = {h["file"] for h in card["heads"].values()}
    for stale in Path(out).glob("*.npz"):
        if stale.name not in keep:
            stale.unlink()
    summary = {
        k: {"version": h["version"], "val": h["val_metrics"], "test": h["test_metrics"]}
        for k, h in card["heads"].items()
    }
    print(
        json.dumps(
            {
                "out": str(out),
                "default_head": card["default_head"],
                "heads": summary,
                "rows": {"used": len(data.instructions), "skipped": data.skipped},
                "head_input": "embedding" if data.embeddings is not None else "features",
            }
        )
    )
    return 0


def _train_version(args: argparse.Namespace, kinds: tuple[Any, ...]) -> int:
    """``--from-log`` into the versions folder: hold out the newest rows, train on the rest,
    compare with the serving version on them, move the finished version into place."""
    import shutil

    from services.predictor.config import default_versions_dir
    from services.predictor.training import sources, versioning
    from services.predictor.training.fit import TrainOptions
    from services.predictor.training.minilm_heads import train_target

    target = args.target_model
    versions_dir = args.versions_dir or Path(default_versions_dir())
    data = sources.newest(
        sources.from_outcome_log(args.from_log, target, args.log_input), args.newest
    )
    held_out = sources.hold_out_recent(data, args.holdout_share, args.holdout_min)
    print(f"training from {data.source}; {held_out.rule}", file=sys.stderr)
    staging = versioning.staging_dir(versions_dir, target)
    try:
        card = train_target(
            data,
            kinds,
            staging,
            options=TrainOptions(hidden=args.hidden, seed=args.seed, max_epochs=args.max_epochs),
            finetune_top_layers=args.finetune_top_layers,
            encoder_weights=args.encoder_weights,
            threads=args.threads,
            progress=not args.no_progress,
            command="shortline " + shlex.join(sys.argv[1:]),
        )
        final, card = versioning.finish_version(
            staging, card, data, held_out, args.from_log, versions_dir, args.heads_dir, args.threads
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    comparison = card["rollout"]["comparison"]
    print(
        json.dumps(
            {
                "out": str(final),
                "version": card["rollout"]["version"],
                "default_head": card["default_head"],
                "held_out": card["rollout"]["held_out"],
                "candidate": comparison["candidate"],
                "serving": comparison["serving"],
                "rows": {"used": len(data.instructions), "skipped": data.skipped},
                "head_input": "embedding" if data.embeddings is not None else "features",
            }
        )
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from services.predictor.features.extractor import ExtractorSettings
    from services.predictor.features.registry import CardRef, build_one
    from services.predictor.heads import load_target
    from services.predictor.training import sources
    from services.predictor.training.evaluation import evaluate_split, format_table

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
    # Features as served (the card's extractor, the service's backend), of the split's
    # rows only: evaluation reads no other row, and SmolLM2 costs 25-70 ms per prompt.
    extractor = build_one(
        CardRef(target.target_model, target.card, target.folder),
        ExtractorSettings(threads=args.threads, backend=args.backend),
    )
    rows = data.indices(args.split)
    features = np.zeros((len(data.instructions), extractor.feature_dim), dtype=np.float32)
    features[rows] = extractor.features([data.instructions[i] for i in rows]).features
    result = evaluate_split(data, features, target.heads, target.boundaries, args.split)
    result["default_head"] = target.default_head
    result["head_versions"] = {k: h.version for k, h in target.heads.items()}
    result["encoder_backend"] = extractor.backend
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """Features as served for every alpaca_eval row (train: the shift; val: the scale;
    test: the report), then each candidate of ``training/distribution.py``."""
    import numpy as np

    from services.predictor.features.extractor import ExtractorSettings
    from services.predictor.features.registry import CardRef, build_one
    from services.predictor.heads import load_all
    from services.predictor.training import distribution, sources

    targets = load_all(args.heads_dir)
    names = args.target_model or sorted(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        print(f"error: no heads for {unknown} in {args.heads_dir}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {}
    built: dict[str, Any] = {}
    for name in names:
        target = targets[name]
        try:
            data = sources.from_alpaca(name)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        ref = CardRef(name, target.card, target.folder)
        key = json.dumps([target.card.get(k) for k in ("features", "encoder")], sort_keys=True)
        if key not in built:  # the five distilled cards share one extractor
            built[key] = build_one(
                ref, ExtractorSettings(threads=args.threads, backend=args.backend)
            )
        unique = sorted(set(data.instructions))
        feats = built[key].features(unique).features
        where = {t: i for i, t in enumerate(unique)}
        features = feats[[where[t] for t in data.instructions]].astype(np.float32)
        section = distribution.section(target.heads, features, data)
        report[name] = {
            "default_head": target.default_head,
            "chosen": section,
            "candidates": distribution.compare(target.heads, features, data),
        }
        if args.write:
            distribution.write_section(target.folder / "card.json", section)
    print(json.dumps(report, indent=2))
    return 0
