"""Distils SmolLM2's view of a prompt into MiniLM: SmolLM2's ordering at MiniLM's speed.

    python -m services.predictor.training.distill \\
        --out services/predictor/artifacts/heads_distilled/encoder

Why: SmolLM2's last-token state orders answer lengths far better than MiniLM's
pooled features (held-out tau 0.61 vs 0.47-0.50 for Llama-3-8B), but costs ~6x
the CPU. Its features are labels that need no answers, so the ~3,400 ShareGPT
and MT-Bench prompts (six times the 559 labelled train instructions) can teach
MiniLM to compute them. The student keeps MiniLM's architecture, so the
service's int8 graph, speed and embedding path are unchanged; only the weights
move, and they ship as a low-rank delta of a few MB.

Recipe: the teacher is the served SmolLM2 int8 feature (layer 20, as
``artifacts/heads_smollm2``) of every train instruction and unlabelled prompt; the
targets are its top principal components, whitened, plus the score of each
shipped SmolLM2 head (one per target model, standardised). MiniLM's six layers
get LoRA adapters on every linear map (layer norms train whole), and a linear
map from the heads' input features (mean-pooled layers 3-6) regresses the
targets. No val or test instruction is ever seen, labelled or not.
Heads are then trained on the student's frozen features by the usual
``shortline predictor train --encoder-weights <out>/weights.npz``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.minilm_backends import ENCODER_NAME
from services.predictor.heads import SMOLLM2_HEADS_DIR, load_target
from services.predictor.training import sources
from services.predictor.training.feature_cache import training_features
from shortline.common import paths

WEIGHTS_FILE = "weights.npz"
# Not card.json: the folder may sit inside a heads folder, whose card.json marks a target.
CARD_FILE = "encoder_card.json"
# The split is the same for every target, so one target's held-out set is all of them.
SPLIT_REFERENCE = "Meta-Llama-3-8B-Instruct"


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = 8
    lr: float = 5e-4
    proj_lr: float = 1e-3
    rank: int = 32
    components: int = 128
    score_weight: float = 1.0
    batch_size: int = 32
    seed: int = 20261203
    teacher_layers: tuple[int, ...] = (20,)
    teacher_max_tokens: int = 254


class LoRALinear:
    """``linear(x) + scale * x @ a.T @ b.T``; ``b`` starts at zero, so training starts at MiniLM."""

    def __init__(self, linear: Any, rank: int) -> None:
        import torch

        self.linear = linear
        self.scale = 1.0
        self.a = torch.nn.Parameter(torch.randn(rank, linear.in_features) / linear.in_features**0.5)
        self.b = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        linear.weight.requires_grad_(False)
        original = linear.forward

        def forward(x: Any) -> Any:
            return original(x) + (x @ self.a.t() @ self.b.t()) * self.scale

        linear.forward = forward

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) with u @ v the weight's delta."""
        u = (self.b.detach() * self.scale).float().numpy()
        return u, self.a.detach().float().numpy()


def add_adapters(model: Any, rank: int) -> tuple[dict[str, LoRALinear], dict[str, Any]]:
    """LoRA on every linear map of the encoder layers; layer norms and biases train whole."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[str, LoRALinear] = {}
    for name, module in model.named_modules():
        if name.startswith("encoder.layer.") and isinstance(module, torch.nn.Linear):
            adapters[f"{name}.weight"] = LoRALinear(module, rank)
    whole = {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("encoder.layer.") and name not in adapters
    }
    for p in whole.values():
        p.requires_grad_(True)
    return adapters, whole


def whitened_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, projection onto the top ``k`` principal axes scaled to unit variance, and
    the share of variance they hold."""
    mu = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((x - mu).T))
    top = np.argsort(values)[::-1][:k]
    return mu, vectors[:, top] / np.sqrt(values[top]), float(values[top].sum() / values.sum())


def teacher_targets(
    texts: list[str], options: DistillOptions, heads_dir: Path
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(n, components + targets) regression targets and the target models scored."""
    feats = training_features(
        texts, options.teacher_layers, options.teacher_max_tokens, 2, "onnx-int8"
    )
    mu, proj, explained = whitened_components(feats, options.components)
    scores, models = [], []
    for folder in sorted(p.parent for p in heads_dir.glob("*/card.json")):
        target = load_target(folder)
        score = target.heads[target.default_head].predict(feats)["score"]
        scores.append((score - score.mean()) / (score.std() or 1.0))
        models.append(target.target_model)
    y = np.concatenate([(feats - mu) @ proj, np.stack(scores, axis=1)], axis=1)
    return y.astype(np.float32), models, {"explained_variance": round(explained, 4)}


def length_batches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: padding would otherwise double the cost."""
    order = np.argsort(lengths + rng.uniform(0, 8, len(lengths)))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def distil(
    texts: list[str],
    y: np.ndarray,
    weights: np.ndarray,
    options: DistillOptions,
    progress: bool,
    on_epoch: Callable[[int, MiniLMEncoder], None] | None = None,
) -> tuple[dict[str, LoRALinear], dict[str, np.ndarray], list[float]]:
    """Trains the adapters; returns them, the deltas of the wholly trained tensors, the losses."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    encoder = MiniLMEncoder(backend="torch", jit=False, threads=2)
    base = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    adapters, whole = add_adapters(encoder.model, options.rank)
    head = torch.nn.Linear(encoder.feature_dim, y.shape[1])
    lora = [p for a in adapters.values() for p in (a.a, a.b)]
    opt = torch.optim.AdamW(
        [
            {"params": lora + list(whole.values()), "lr": options.lr},
            {"params": head.parameters(), "lr": options.proj_lr},
        ],
        weight_decay=0.01,
    )
    rows = encoder.token_ids(texts)
    lengths = np.array([len(r) for r in rows])
    target = torch.from_numpy(y)
    w = torch.from_numpy(weights.astype(np.float32))
    losses: list[float] = []
    encoder.model.train()
    steps = options.epochs * -(-len(rows) // options.batch_size)
    bar = tqdm(total=steps, desc="distil MiniLM", unit="batch", disable=not progress)
    for epoch in range(options.epochs):
        total = 0.0
        for sel in length_batches(lengths, options.batch_size, rng):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, feats = encoder.forward_ids([rows[i] for i in sel])
            loss = (((head(feats.float()) - target[sel]) ** 2) * w).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(sel)
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1} loss {float(loss.detach()):.3f}")
        losses.append(round(total / len(rows), 4))
        if on_epoch is not None:
            # Whatever the callback draws (e.g. a head's seeded fit) leaves training's
            # dropout draws alone, so monitoring does not change the weights.
            with torch.random.fork_rng():
                encoder.model.eval()
                on_epoch(epoch, encoder)
                encoder.model.train()
    bar.close()
    deltas = {name: (p.detach() - base[name]).float().numpy() for name, p in whole.items()}
    return adapters, deltas, losses


def write_weights(
    file: Path, adapters: dict[str, LoRALinear], whole: dict[str, np.ndarray]
) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, adapter in adapters.items():
        u, v = adapter.factors()
        arrays[f"{name}::u"], arrays[f"{name}::v"] = u.astype(np.float16), v.astype(np.float16)
    for name, delta in whole.items():
        arrays[f"{name}::d"] = delta.astype(np.float16)
    np.savez_compressed(file, **arrays)


def repo_relative(path: Path) -> str:
    path = path.resolve()
    return (
        str(path.relative_to(paths.REPO_ROOT))
        if path.is_relative_to(paths.REPO_ROOT)
        else str(path)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help=f"folder for {WEIGHTS_FILE} and {CARD_FILE}"
    )
    parser.add_argument("--teacher-heads", type=Path, default=SMOLLM2_HEADS_DIR)
    defaults = DistillOptions()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--limit", type=int, default=0, help="use the first N prompts (tests)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    options = DistillOptions(epochs=args.epochs, rank=args.rank, lr=args.lr)

    import torch

    torch.set_num_threads(2)
    data = sources.from_alpaca(SPLIT_REFERENCE)
    held_out = {data.instructions[i] for i in np.flatnonzero(data.splits != "train")}
    train = sorted({data.instructions[i] for i in data.indices("train")})
    unlabelled = sources.unlabelled_prompts(held_out)
    texts = train + unlabelled
    if args.limit:
        texts = texts[: args.limit]
    assert not held_out & set(texts)
    start = time.perf_counter()
    y, scored, teacher_info = teacher_targets(texts, options, args.teacher_heads)
    teacher_seconds = time.perf_counter() - start
    weights = np.full(y.shape[1], 1.0 / options.components)
    weights[options.components :] = options.score_weight
    start = time.perf_counter()
    adapters, deltas, losses = distil(texts, y, weights, options, not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / WEIGHTS_FILE
    write_weights(file, adapters, deltas)
    card = {
        "what": "all-MiniLM-L6-v2 distilled from SmolLM2-135M-Instruct's prompt features",
        "base": ENCODER_NAME,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "format": "per weight matrix <name>::u @ <name>::v (fp16) is its delta; <name>::d "
        "(fp16) is the delta of a layer norm or bias; untouched: embeddings",
        "date": f"{dt.date.today():%Y-%m-%d}",
        "teacher": {
            "features": f"SmolLM2-135M-Instruct layer {list(options.teacher_layers)}, last "
            "token, served onnx-int8 graph (services/predictor/features/smollm2_onnx.py)",
            "targets": f"top {options.components} principal components, whitened, weight "
            f"{1 / options.components:.4g} each; plus the standardised score of the default "
            f"head in {repo_relative(args.teacher_heads)} for {scored}, weight "
            f"{options.score_weight} each",
            **teacher_info,
            "seconds": round(teacher_seconds, 1),
        },
        "data": {
            "prompts": len(texts),
            "alpaca_eval_train_instructions": len(train),
            "unlabelled_prompts": len(unlabelled),
            "unlabelled_also_train_instructions": len(set(unlabelled) & set(train)),
            "unlabelled": "first turns of ShareGPT (prompts/sharegpt/*.json) and MT-Bench "
            "(prompts/mt_bench/question.jsonl), minus any val or test instruction",
            "held_out": "no val or test instruction of the alpaca_eval split is used",
        },
        "options": asdict(options),
        "loss_per_epoch": losses,
        "train_seconds": round(time.perf_counter() - start, 1),
        "command": "python -m services.predictor.training.distill " + shlex.join(sys.argv[1:]),
    }
    (args.out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({"out": str(file), "bytes": file.stat().st_size, "loss": losses}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
