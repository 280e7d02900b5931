"""Fitting heads with torch: the three losses, early stopping on validation tau.

The encoder is frozen by default, so training works on cached embeddings and
takes seconds. With ``finetune_top_layers > 0`` the top encoder layers train
too; then every step runs the encoder (minutes on two cores).
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.predictor.heads import N_BUCKETS, Head, HeadKindName
from services.predictor.training.buckets import bucket_of
from shortline.common.stats import kendall_tau

log = logging.getLogger(__name__)

N_QUANTILES = 101


@dataclass(frozen=True)
class TrainOptions:
    hidden: int = 32
    dropout: float = 0.2
    lr: float = 3e-4
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 30
    seed: int = 20261125
    rank_margin: float = 0.0


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, out_dim),
    )


def out_dim(kind: HeadKindName) -> int:
    return N_BUCKETS if kind == "cls" else 1


def regression_loss(out: Any, tokens: Any, mu: float = 0.0, sd: float = 1.0) -> Any:
    """Squared error on the standardised log(1 + tokens)."""
    import torch

    return torch.nn.functional.mse_loss(out[:, 0], (torch.log1p(tokens) - mu) / sd)


def classification_loss(out: Any, buckets: Any) -> Any:
    import torch

    return torch.nn.functional.cross_entropy(out, buckets)


def pairwise_ranking_loss(scores: Any, tokens: Any, margin: float = 0.0) -> Any:
    """Logistic loss over every pair in the batch whose true lengths differ.

    For each pair with ``tokens[i] > tokens[j]`` the loss is
    ``softplus(margin - (s_i - s_j))``: it asks the longer job to score higher,
    as in vllm-ltr's pairwise variant, and ignores absolute scale.
    """
    import torch

    s = scores.reshape(-1)
    diff_s = s[:, None] - s[None, :]
    longer = (tokens[:, None] > tokens[None, :]).to(s.dtype)
    n_pairs = longer.sum()
    if float(n_pairs) == 0.0:
        return s.sum() * 0.0
    losses = torch.nn.functional.softplus(margin - diff_s) * longer
    return losses.sum() / n_pairs


def head_from_module(
    kind: HeadKindName,
    mlp: Any,
    boundaries: list[float],
    medians: list[float],
    train_scores: np.ndarray | None,
    train_tokens: np.ndarray,
    version: str = "unversioned",
) -> Head:
    """The numpy :class:`Head` equal to the torch MLP (Linear layers only)."""
    import torch

    layers = [
        (m.weight.detach().float().numpy().T.copy(), m.bias.detach().float().numpy().copy())
        for m in mlp
        if isinstance(m, torch.nn.Linear)
    ]
    sq = lq = None
    if kind == "rank":
        assert train_scores is not None
        qs = np.linspace(0.0, 100.0, N_QUANTILES)
        sq = np.percentile(train_scores, qs)
        lq = np.percentile(train_tokens.astype(np.float64), qs)
        # np.interp needs increasing x; equal score quantiles (a flat region)
        # are nudged apart so the mapping stays a function.
        sq = np.maximum.accumulate(sq + np.arange(len(sq)) * 1e-9)
    return Head(
        kind=kind,
        version=version,
        layers=layers,
        bucket_boundaries=boundaries,
        bucket_medians=medians,
        score_quantiles=sq,
        length_quantiles=lq,
    )


def fold_standardization(head: Head, mean: np.ndarray, std: np.ndarray) -> None:
    """Makes a head trained on ``(x - mean) / std`` take raw ``x`` (exactly, in place).

    ``((x - m) / s) @ W + b == x @ (W / s) + (b - (m / s) @ W)``, so the shipped
    weights need no separate normalisation arrays.
    """
    w, b = head.layers[0]
    w64, s64, m64 = w.astype(np.float64), std.astype(np.float64), mean.astype(np.float64)
    head.layers[0] = (
        (w64 / s64[:, None]).astype(np.float32),
        (b.astype(np.float64) - (m64 / s64) @ w64).astype(np.float32),
    )


Features = Callable[[np.ndarray, bool], Any]


def fit_head(
    kind: HeadKindName,
    features: Features,
    in_dim: int,
    train_idx: np.ndarray,
    train_tokens: np.ndarray,
    val_idx: np.ndarray,
    val_tokens: np.ndarray,
    boundaries: list[float],
    medians: list[float],
    options: TrainOptions = TrainOptions(),
    extra_params: Sequence[Any] = (),
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[Head, dict[str, Any], Any]:
    """Trains one head; returns the best-on-val numpy head, a log, and the torch MLP.

    ``features(indices, training)`` returns the float tensor of inputs for those
    rows (cached embeddings, or an encoder forward when fine-tuning).
    ``train_tokens`` are the true lengths of the weighting rows
    ``train_idx`` (may repeat indices, e.g. several models' answers to one
    instruction). Selection: the epoch with the best Kendall's tau on val.
    """
    import torch

    seed_everything(options.seed)
    mlp = make_mlp(in_dim, options.hidden, out_dim(kind), options.dropout)
    params = list(mlp.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    y_tokens = torch.tensor(train_tokens, dtype=torch.float32)
    # Regression learns the standardised log length (fast to fit from a zero
    # init); the affine map back is folded into the last layer afterwards.
    log_y = np.log1p(train_tokens.astype(np.float64))
    reg_mu, reg_sd = float(log_y.mean()), float(log_y.std() or 1.0)
    y_buckets = torch.tensor(bucket_of(train_tokens, boundaries), dtype=torch.long)
    gen = np.random.default_rng(options.seed)

    def scores_of(idx: np.ndarray) -> np.ndarray:
        mlp.eval()
        with torch.no_grad():
            chunks = [
                mlp(features(idx[i : i + 256], False)).float().numpy()
                for i in range(0, len(idx), 256)
            ]
        return np.concatenate(chunks)

    def as_head(version: str = "unversioned") -> Head:
        train_scores = scores_of(train_idx)[:, 0] if kind == "rank" else None
        head = head_from_module(kind, mlp, boundaries, medians, train_scores, train_tokens, version)
        if kind == "reg":
            w, b = head.layers[-1]
            head.layers[-1] = (w * reg_sd, b * reg_sd + reg_mu)
        return head

    best_tau = -2.0
    best_state: dict[str, Any] | None = None
    best_extra: list[Any] | None = None
    best_epoch = -1
    history: list[tuple[int, float, float]] = []
    for epoch in range(options.max_epochs):
        mlp.train()
        order = gen.permutation(len(train_idx))
        total = 0.0
        for start in range(0, len(order), options.batch_size):
            sel = order[start : start + options.batch_size]
            out = mlp(features(train_idx[sel], True)).float()
            if kind == "reg":
                loss = regression_loss(out, y_tokens[sel], reg_mu, reg_sd)
            elif kind == "cls":
                loss = classification_loss(out, y_buckets[sel])
            else:
                loss = pairwise_ranking_loss(out, y_tokens[sel], options.rank_margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(sel)
        train_loss = total / len(order)
        head = as_head()
        val_raw = scores_of(val_idx)
        if kind == "reg":
            val_raw = val_raw * reg_sd + reg_mu
        val_pred = head.from_raw(val_raw)["tokens"]
        tau = kendall_tau(val_pred, val_tokens)
        history.append((epoch, train_loss, tau))
        if on_epoch is not None:
            on_epoch(epoch, train_loss, tau)
        if tau > best_tau:
            best_tau, best_epoch = tau, epoch
            best_state = copy.deepcopy(mlp.state_dict())
            best_extra = [p.detach().clone() for p in extra_params]
        elif epoch - best_epoch >= options.patience:
            break
    assert best_state is not None
    mlp.load_state_dict(best_state)
    if best_extra is not None:
        with torch.no_grad():
            for p, saved in zip(extra_params, best_extra, strict=True):
                p.copy_(saved)
    head = as_head()
    log_info = {
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val_kendall_tau": best_tau,
        "history": history,
    }
    return head, log_info, mlp
