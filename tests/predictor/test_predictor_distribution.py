"""Length distributions (issue 19): quantiles beside every point, calibrated, and optional.

The shipped cards carry a ``distribution`` section (``shortline predictor calibrate``);
an older card without it must still load and serve, with no quantiles.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from scipy import stats

from services.predictor import offline
from services.predictor.config import PredictorConfig
from services.predictor.core import Query
from services.predictor.heads import (
    DISTRIBUTION_SECTION,
    SHIPPED_HEADS_DIR,
    STOCK_HEADS_DIR,
    Head,
    HeadDistribution,
    load_target,
)
from services.predictor.service import PredictorServer
from services.predictor.training import distribution, sources
from services.predictor.training.sources import TrainingData
from shortline.common import paths
from shortline.common.length_distribution import QUANTILE_LEVELS
from shortline.common.net import free_port
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

LLAMA = "Meta-Llama-3-8B-Instruct"
PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a detailed, multi-section essay on the causes of the First World War.",
    "Give me three synonyms for happy.",
]
KINDS = {
    "reg": predictor_pb2.HEAD_KIND_REGRESSION,
    "cls": predictor_pb2.HEAD_KIND_CLASSIFICATION,
    "rank": predictor_pb2.HEAD_KIND_RANKING,
}
# Each level's share of the 173 test lengths under the shipped Llama-3 head's quantile
# must be within this of the level. The share's own sampling error on 173 rows is at
# most sqrt(0.25 / 173) = 0.038, and the scale was fitted on 73 val rows: 0.08 is about
# two standard errors. Measured: at most 0.054 (card's distribution.test).
CALIBRATION_TOLERANCE = 0.08


def assert_quantiles(q: np.ndarray, n: int) -> None:
    assert q.shape == (n, len(QUANTILE_LEVELS))
    assert np.all(np.diff(q, axis=1) >= 0.0)
    assert np.all(q >= 1.0) and np.all(np.isfinite(q))


def test_quantiles_follow_the_family_and_stay_ordered_and_capped() -> None:
    dist = HeadDistribution.of("student_t", {"shift": 0.1, "scale": 0.3, "df": 2.0}, 2000.0)
    tokens = np.array([0.0, 1.0, 40.0, 400.0, 1e6])
    q = dist.quantiles(tokens)
    assert_quantiles(q, len(tokens))
    assert q.max() == 2000.0
    # Below the cap, each quantile is the family's: log1p(q) = log1p(point) + shift + scale*z.
    expected = np.expm1(np.log1p(40.0) + 0.1 + 0.3 * stats.t.ppf(np.array(QUANTILE_LEVELS), 2.0))
    np.testing.assert_allclose(q[2], np.minimum(expected, 2000.0), rtol=1e-9)
    gauss = HeadDistribution.of("gaussian", {"shift": 0.0, "scale": 0.5}, 1e9)
    np.testing.assert_allclose(
        np.log1p(gauss.quantiles(np.array([100.0]))[0]),
        np.log1p(100.0) + 0.5 * stats.norm.ppf(np.array(QUANTILE_LEVELS)),
        rtol=1e-9,
    )
    with pytest.raises(ValueError, match="bad student_t"):
        HeadDistribution.of("student_t", {"shift": 0.0, "scale": 0.0, "df": 2.0}, 10.0)


def _synthetic(n: int, seed: int) -> tuple[TrainingData, np.ndarray, Head]:
    """Lengths log-t around a known point, and a head that predicts exactly that point."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1))
    noise = 0.4 * rng.standard_t(3.0, size=n) + 0.2
    tokens = np.maximum(np.round(np.expm1(5.0 + x[:, 0] + noise)), 1.0)
    splits = rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.4, 0.3, 0.3])
    data = TrainingData("synthetic", "test", [f"p{i}" for i in range(n)], tokens,
                        np.ones(n), splits)  # fmt: skip
    head = Head("reg", "reg-test", [(np.ones((1, 1), np.float32), np.full(1, 5.0, np.float32))],
                [50.0, 100.0, 200.0, 400.0], [1.0] * 5)  # fmt: skip
    return data, x.astype(np.float32), head


def test_fitting_recovers_a_known_distribution_and_is_calibrated_on_test() -> None:
    data, features, head = _synthetic(6000, seed=7)
    section = distribution.section({"reg": head}, features, data)
    params = section["heads"]["reg"]
    assert params["shift"] == pytest.approx(0.2, abs=0.03)
    assert params["scale"] == pytest.approx(0.4, abs=0.04)
    assert params["df"] == pytest.approx(3.0, abs=0.8)
    test = section["test"]["by_head"]["reg"]
    # Levels below the cap (the longest train length bounds the 0.99 quantile).
    assert test["max_abs_error"] < 0.03
    candidates = distribution.compare({"reg": head}, features, data)["reg"]
    assert candidates["student_t"]["log_lik"] > candidates["gaussian"]["log_lik"]


@pytest.fixture(scope="module")
def old_card_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stock Llama-3 heads with the card as it was before issue 19."""
    folder = tmp_path_factory.mktemp("old") / LLAMA
    shutil.copytree(STOCK_HEADS_DIR / LLAMA, folder)
    card = json.loads((folder / "card.json").read_text())
    assert card.pop(DISTRIBUTION_SECTION)
    (folder / "card.json").write_text(json.dumps(card))
    return folder.parent


def test_an_old_card_or_an_unknown_family_gives_no_quantiles(
    old_card_dir: Path, tmp_path: Path
) -> None:
    old = load_target(old_card_dir / LLAMA)
    out = old.heads["reg"].predict(np.zeros((2, 1536), np.float32))
    assert out["quantiles"].shape == (2, 0)
    future = tmp_path / LLAMA
    shutil.copytree(STOCK_HEADS_DIR / LLAMA, future)
    card = json.loads((future / "card.json").read_text())
    card[DISTRIBUTION_SECTION]["family"] = "skew_future"
    (future / "card.json").write_text(json.dumps(card))
    assert all(h.distribution is None for h in load_target(future).heads.values())
    # The shipped card has one for every head.
    shipped = load_target(SHIPPED_HEADS_DIR / LLAMA)
    assert all(h.distribution is not None for h in shipped.heads.values())


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def servers(old_card_dir: Path) -> AsyncIterator[dict[str, PredictorServer]]:
    started = {}
    for name, heads_dir in (("shipped", SHIPPED_HEADS_DIR), ("old", old_card_dir)):
        server = PredictorServer(
            PredictorConfig(port=free_port(), heads_dir=str(heads_dir), threads=2)
        )
        await server.start()
        started[name] = server
    try:
        yield started
    finally:
        for server in started.values():
            await server.stop(0.5)


async def _predict(
    server: PredictorServer, request: predictor_pb2.PredictRequest
) -> predictor_pb2.PredictResponse:
    async with grpc.aio.insecure_channel(server.cfg.address) as channel:
        return await predictor_pb2_grpc.PredictorServiceStub(channel).Predict(request)


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_every_prediction_carries_quantiles_at_the_listed_levels(
    servers: dict[str, PredictorServer], kind: str
) -> None:
    response = await _predict(
        servers["shipped"],
        predictor_pb2.PredictRequest(target_model=LLAMA, prompts=PROMPTS, head=KINDS[kind]),
    )
    assert list(response.quantile_levels) == pytest.approx(QUANTILE_LEVELS)
    q = np.array([list(p.quantiles) for p in response.predictions])
    assert_quantiles(q, len(PROMPTS))
    points = np.array([p.predicted_tokens for p in response.predictions])
    # The point sits inside the middle half (the shifts are small against the spread).
    assert np.all((q[:, 1] <= points) & (points <= q[:, 3]))
    # Longer predicted answers have higher quantiles (the 0.99 ones may both sit at the cap).
    assert np.all(q[1, :-1] > q[0, :-1]) and q[1, -1] >= q[0, -1]


async def test_list_models_names_the_levels_and_an_old_card_serves_without(
    servers: dict[str, PredictorServer],
) -> None:
    async with grpc.aio.insecure_channel(servers["shipped"].cfg.address) as channel:
        models = await predictor_pb2_grpc.PredictorServiceStub(channel).ListModels(
            predictor_pb2.ListModelsRequest()
        )
    assert all(list(m.quantile_levels) == pytest.approx(QUANTILE_LEVELS) for m in models.models)
    old = await _predict(
        servers["old"], predictor_pb2.PredictRequest(target_model=LLAMA, prompts=PROMPTS)
    )
    assert [p.predicted_tokens >= 1.0 for p in old.predictions] == [True] * 3
    assert list(old.quantile_levels) == []
    assert all(len(p.quantiles) == 0 for p in old.predictions)


async def test_shipped_llama_head_is_calibrated_on_the_test_split(
    servers: dict[str, PredictorServer],
) -> None:
    if not paths.alpaca_eval_outputs(LLAMA).exists():
        pytest.skip("shared data absent")
    data = sources.from_alpaca(LLAMA)
    rows = data.indices("test")
    core = servers["shipped"].core
    assert core is not None
    result = core.predict(Query(LLAMA, [data.instructions[i] for i in rows], embedding=False))
    shares = distribution.calibration(result.quantiles, data.tokens[rows])
    assert np.abs(np.array(shares) - QUANTILE_LEVELS).max() <= CALIBRATION_TOLERANCE, shares
    # What the card reports is what is served.
    card = load_target(SHIPPED_HEADS_DIR / LLAMA).card[DISTRIBUTION_SECTION]
    reported = card["test"]["by_head"][result.head]["shares"]
    np.testing.assert_allclose(shares, reported, atol=0.02)


def test_offline_predict_distribution_matches_the_point() -> None:
    tokens, q = offline.predict_distribution(LLAMA, PROMPTS)
    assert_quantiles(q, len(PROMPTS))
    np.testing.assert_allclose(tokens, offline.predict_tokens(LLAMA, PROMPTS))
    empty_tokens, empty_q = offline.predict_distribution(LLAMA, [])
    assert empty_tokens.shape == (0,) and empty_q.shape == (0, len(QUANTILE_LEVELS))


def test_a_version_trained_from_the_log_gets_a_distribution(tmp_path: Path) -> None:
    from test_predictor_from_log import write_log

    from shortline import cli

    model = "my-served-llm"
    log_path = tmp_path / "outcomes.sqlite"
    write_log(log_path, model)
    versions = tmp_path / "versions"
    code = cli.main(
        ["predictor", "train", "--target-model", model, "--from-log", str(log_path),
         "--versions-dir", str(versions), "--heads-dir", str(tmp_path / "none"),
         "--head", "reg", "--max-epochs", "20", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    (folder,) = [p for p in (versions / model).iterdir() if not p.name.startswith(".")]
    card = json.loads((folder / "card.json").read_text())
    section = card[DISTRIBUTION_SECTION]
    # Judged on the held-out newest rows the version's rollout compares on.
    assert section["test"]["rows"] == card["rollout"]["held_out"]["rows"]
    assert set(section["test"]["by_head"]) == {"reg"}
    head = load_target(folder).heads["reg"]
    assert head.distribution is not None
    assert_quantiles(head.predict(np.zeros((2, 1536), np.float32))["quantiles"], 2)
