"""Bucket boundaries, the three losses on a tiny synthetic set, and metrics against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from services.predictor.training.buckets import bucket_boundaries, bucket_medians, bucket_of
from services.predictor.training.evaluation import evaluate
from services.predictor.training.fit import (
    TrainOptions,
    classification_loss,
    fit_head,
    make_mlp,
    pairwise_ranking_loss,
    regression_loss,
    seed_everything,
)
from shortline.common.stats import kendall_tau, spearman


def test_bucket_boundaries_are_the_train_percentiles() -> None:
    lengths = np.arange(1, 101)
    b = bucket_boundaries(lengths)
    assert b == pytest.approx([25.75, 50.5, 75.25, 99.01])
    assert list(bucket_of([1, 25.75, 26, 99.01, 100, 5000], b)) == [0, 0, 1, 3, 4, 4]


def test_bucket_medians_fall_inside_their_buckets() -> None:
    lengths = np.arange(1, 101)
    b = bucket_boundaries(lengths)
    med = bucket_medians(lengths, b)
    assert med == pytest.approx([13.0, 38.0, 63.0, 87.5, 100.0])


def test_no_train_lengths_is_an_error() -> None:
    with pytest.raises(ValueError, match="train length"):
        bucket_boundaries([])


def synthetic(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Length is a monotone function of the first feature, plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    tokens = np.exp(4.0 + 1.2 * x[:, 0] + 0.1 * rng.normal(size=n)).round() + 1
    return torch.tensor(x), torch.tensor(tokens, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["reg", "cls", "rank"])
def test_each_loss_decreases_on_a_tiny_synthetic_set(kind: str) -> None:
    seed_everything(0)
    x, tokens = synthetic()
    boundaries = bucket_boundaries(tokens.numpy())
    buckets = torch.tensor(bucket_of(tokens.numpy(), boundaries), dtype=torch.long)
    mlp = make_mlp(8, 16, 5 if kind == "cls" else 1, 0.0)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    mu, sd = float(torch.log1p(tokens).mean()), float(torch.log1p(tokens).std())

    def loss() -> torch.Tensor:
        out = mlp(x)
        if kind == "reg":
            return regression_loss(out, tokens, mu, sd)
        if kind == "cls":
            return classification_loss(out, buckets)
        return pairwise_ranking_loss(out, tokens)

    first = float(loss().detach())
    for _ in range(100):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < 0.5 * first


def test_ranking_loss_ignores_ties_and_rewards_correct_order() -> None:
    tokens = torch.tensor([10.0, 20.0, 30.0])
    right = pairwise_ranking_loss(torch.tensor([[0.0], [1.0], [2.0]]), tokens)
    wrong = pairwise_ranking_loss(torch.tensor([[2.0], [1.0], [0.0]]), tokens)
    assert float(right) < float(wrong)
    tied = pairwise_ranking_loss(torch.tensor([[5.0], [1.0]]), torch.tensor([7.0, 7.0]))
    assert float(tied) == 0.0


@pytest.mark.parametrize("kind", ["reg", "cls", "rank"])
def test_fit_head_learns_the_order_of_synthetic_lengths(kind: str) -> None:
    x, tokens = synthetic(n=300, seed=1)
    y = tokens.numpy().astype(np.float64)
    train, val, test = np.arange(0, 200), np.arange(200, 240), np.arange(240, 300)
    b = bucket_boundaries(y[train])
    head, info, _ = fit_head(
        kind,  # type: ignore[arg-type]
        lambda idx, training: x[idx],
        8,
        train,
        y[train],
        val,
        y[val],
        b,
        bucket_medians(y[train], b),
        TrainOptions(hidden=16, max_epochs=60, patience=20, lr=1e-2),
    )
    pred = head.predict(x[test].numpy())
    assert kendall_tau(pred["tokens"], y[test]) > 0.6
    assert info["val_kendall_tau"] > 0.6
    if kind == "rank":
        # Quantile mapping puts predictions on the scale of train lengths.
        assert np.median(pred["tokens"]) == pytest.approx(np.median(y[test]), rel=0.5)


def test_metrics_match_scipy_on_known_input() -> None:
    rng = np.random.default_rng(3)
    actual = rng.integers(1, 50, size=200).astype(float)  # many ties
    predicted = actual + rng.normal(scale=15, size=200).round()
    assert kendall_tau(predicted, actual) == pytest.approx(
        stats.kendalltau(predicted, actual).statistic, abs=1e-12
    )
    assert spearman(predicted, actual) == pytest.approx(
        stats.spearmanr(predicted, actual).statistic, abs=1e-12
    )
    m = evaluate([10, 20, 30, 40], [10, 25, 40, 100], [15, 35])
    assert m["mae_tokens"] == pytest.approx((0 + 5 + 10 + 60) / 4)
    assert m["bucket_accuracy"] == pytest.approx(3 / 4)
    assert m["kendall_tau"] == pytest.approx(1.0)


def test_constant_prediction_orders_nothing() -> None:
    assert kendall_tau([5, 5, 5], [1, 2, 3]) == 0.0
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0
