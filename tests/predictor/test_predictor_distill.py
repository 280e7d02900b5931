"""MiniLM distilled from SmolLM2: the weight delta's format, training, and the shipped heads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from services.predictor.core import PredictorCore, Query
from services.predictor.features.distilled import TunedMiniLMFeatures
from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.tuned_weights import delta_state
from services.predictor.heads import DISTILLED_HEADS_DIR, STOCK_HEADS_DIR, load_all
from services.predictor.training import distill, sources
from shortline.common import paths

DISTILLED_DIR = DISTILLED_HEADS_DIR
LLAMA = "Meta-Llama-3-8B-Instruct"
WEIGHTS = DISTILLED_DIR / "encoder" / distill.WEIGHTS_FILE
SHIPPED = sorted(
    [
        "Meta-Llama-3-8B-Instruct",
        "vicuna-13b-v1.5",
        "Mistral-7B-Instruct-v0.2",
        "gpt4_1106_preview",
        "claude-2.1",
    ]
)
PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a detailed, multi-section essay on the causes of the First World War.",
    "Give me three synonyms for happy.",
]


def _features(encoder: MiniLMEncoder, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        return encoder.forward(texts)[1].numpy()


def test_a_written_delta_loads_back_as_the_adapted_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = MiniLMEncoder(backend="torch", jit=False, threads=1, precision="fp32")
    base = _features(student, PROMPTS)
    adapters, whole = distill.add_adapters(student.model, rank=4)
    # What training would do: move the adapters and a layer norm off their start.
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.b.normal_(0.0, 0.02)
        norm = "encoder.layer.5.output.LayerNorm.weight"
        before = whole[norm].detach().clone()
        whole[norm].mul_(1.1)
    adapted = _features(student, PROMPTS)
    assert np.abs(adapted - base).max() > 0.05
    deltas = {norm: (whole[norm].detach() - before).numpy()}
    file = tmp_path / distill.WEIGHTS_FILE
    distill.write_weights(file, adapters, deltas)

    loaded = MiniLMEncoder(backend="torch", jit=False, threads=1, precision="fp32")
    loaded.load_tuned_layers(file)
    assert loaded.tag.startswith("tuned-")
    # fp16 factors: the loaded encoder reproduces the adapted one to rounding.
    np.testing.assert_allclose(_features(loaded, PROMPTS), adapted, rtol=0, atol=2e-3)


def test_a_delta_naming_an_unknown_or_misshapen_weight_is_refused(tmp_path: Path) -> None:
    encoder = MiniLMEncoder(backend="torch", jit=False, threads=1)
    state = encoder.model.state_dict()
    unknown = tmp_path / "unknown.npz"
    np.savez(unknown, **{"encoder.layer.9.attention.self.query.weight::d": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="not a weight of the encoder"):
        delta_state(state, unknown)
    misshapen = tmp_path / "misshapen.npz"
    np.savez(
        misshapen,
        **{
            "encoder.layer.0.attention.self.query.weight::u": np.zeros((384, 2)),
            "encoder.layer.0.attention.self.query.weight::v": np.zeros((2, 100)),
        },
    )
    with pytest.raises(ValueError, match=r"shape \(384, 100\)"):
        delta_state(state, misshapen)


def test_distilling_fits_the_targets() -> None:
    rng = np.random.default_rng(0)
    texts = [f"Question {i}: " + "word " * int(rng.integers(1, 30)) for i in range(32)]
    y = rng.normal(size=(len(texts), 3)).astype(np.float32)
    # Targets that follow the prompt's length, which MiniLM can learn quickly.
    y[:, 0] = np.array([len(t) for t in texts]) / 50.0
    options = distill.DistillOptions(epochs=6, rank=4, batch_size=8, lr=2e-3)
    adapters, deltas, losses = distill.distil(texts, y, np.ones(3), options, progress=False)
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]
    assert all(name.startswith("encoder.layer.") for name in deltas)
    assert len(adapters) == 6 * 6  # q, k, v, attention output, intermediate, output per layer


def test_unlabelled_prompts_leave_out_what_they_are_told() -> None:
    if not (paths.data_dir() / "prompts" / "sharegpt").is_dir():
        pytest.skip("shared data absent")
    every = sources.unlabelled_prompts(set())
    assert len(every) > 3000
    assert every == sorted(every)
    kept = sources.unlabelled_prompts(set(every[:10]))
    assert kept == every[10:]


def test_shipped_distilled_heads_share_one_small_encoder_delta() -> None:
    targets = load_all(DISTILLED_DIR)
    assert sorted(targets) == SHIPPED
    assert WEIGHTS.stat().st_size < 3_000_000
    encoder_card = json.loads((WEIGHTS.parent / distill.CARD_FILE).read_text())
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert encoder_card["weights_sha256"] == digest
    for name, target in targets.items():
        enc = target.card["encoder"]
        assert (DISTILLED_DIR / name / enc["layers_file"]).resolve() == WEIGHTS.resolve()
        assert enc["weights_sha256"] == digest
        for info in target.card["heads"].values():
            assert (DISTILLED_DIR / name / info["file"]).stat().st_size < 400_000


@pytest.mark.slow
def test_distilled_heads_serve_from_one_tuned_encoder() -> None:
    core = PredictorCore(DISTILLED_DIR, threads=2)
    encoders = {id(core.extractor_of(name)) for name in SHIPPED}
    assert len(encoders) == 1
    tuned_features = core.extractor_of(SHIPPED[0])
    assert isinstance(tuned_features, TunedMiniLMFeatures)
    assert tuned_features.encoder is not core.encoder
    results = core.predict_batch([Query(target_model=name, prompts=PROMPTS) for name in SHIPPED])
    stock = core.encoder.encode(PROMPTS)
    for result in results:
        assert result.tokens.shape == (3,)
        # The one-word answer is predicted shorter than the essay.
        assert result.tokens[0] < result.tokens[1]
        # The embedding is all-MiniLM-L6-v2's, not the tuned encoder's pooled vector.
        np.testing.assert_allclose(result.embeddings, stock, atol=1e-6)
    tuned = tuned_features.encoder.encode(PROMPTS)
    assert np.median((tuned * stock).sum(axis=1)) < 0.95
    # Callers that do not read it (the simulator, a scheduler without a cache) skip it.
    bare = core.predict(Query(SHIPPED[0], PROMPTS, embedding=False))
    assert bare.embeddings.shape == (3, 0)
    np.testing.assert_allclose(bare.tokens, results[SHIPPED.index(SHIPPED[0])].tokens)


@pytest.fixture(scope="module")
def eval_output() -> dict:  # type: ignore[type-arg]
    if not paths.alpaca_eval_outputs(LLAMA).exists():
        pytest.skip("shared data absent")
    out = subprocess.run(
        [sys.executable, "-m", "shortline.cli", "predictor", "eval", "--target-model", LLAMA,
         "--heads-dir", str(DISTILLED_DIR), "--json"],
        check=True, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_served_rank_head_reaches_the_issue_target_on_test(eval_output: dict) -> None:  # type: ignore[type-arg]
    card = json.loads((DISTILLED_DIR / LLAMA / "card.json").read_text())
    assert eval_output["split"] == "test" and eval_output["n"] == 173
    assert eval_output["encoder_backend"] == "onnx-int8"
    tau = {k: v["kendall_tau"] for k, v in eval_output["heads"].items()}
    # Served on int8 features; the card's figures are the torch (training) ones.
    for kind, head in card["heads"].items():
        assert tau[kind] == pytest.approx(head["test_metrics"]["kendall_tau"], abs=0.01), kind
    assert tau["rank"] >= 0.60
    # Well above the stock encoder's heads (0.45-0.50 for Llama-3-8B).
    stock = json.loads((STOCK_HEADS_DIR / LLAMA / "card.json").read_text())
    for kind, head in stock["heads"].items():
        assert tau[kind] > head["test_metrics"]["kendall_tau"] + 0.05, kind
