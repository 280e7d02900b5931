"""The ONNX Runtime fast path computes the torch path's features (so the heads' tau holds)."""

from __future__ import annotations

import numpy as np
import pytest

from services.predictor.features import onnx_export
from services.predictor.features.minilm import MiniLMEncoder
from services.predictor.features.minilm_backends import resolve_backend

pytestmark = pytest.mark.skipif(not onnx_export.available(), reason="onnxruntime not installed")

TEXTS = [
    "What is 2+2?",
    "Write a poem about the sea.",
    "Summarise this. " + "filler words " * 120 + "Answer in one word.",
    "List three primes and explain why each is prime, in detail, for a child.",
    "Hi",
    "Translate 'good morning' into French, German, Spanish and Italian.",
]


@pytest.fixture(scope="module")
def torch_fp32() -> MiniLMEncoder:
    # Eager fp32: the reference the graph was exported from.
    return MiniLMEncoder(max_tokens=64, precision="fp32", threads=2, jit=False)


@pytest.fixture(scope="module")
def fast() -> MiniLMEncoder:
    return MiniLMEncoder(max_tokens=64, threads=2, backend="onnx")


def test_onnx_features_match_torch_fp32(torch_fp32: MiniLMEncoder, fast: MiniLMEncoder) -> None:
    ref_emb, ref_feat = torch_fp32.encode_features(TEXTS)
    emb, feat = fast.encode_features(TEXTS)
    assert feat.shape == ref_feat.shape == (len(TEXTS), fast.feature_dim)
    scale = np.abs(ref_feat).max()
    np.testing.assert_allclose(feat, ref_feat, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-4, rtol=0)


def test_onnx_features_match_the_bf16_features_heads_were_trained_on(fast: MiniLMEncoder) -> None:
    if MiniLMEncoder(max_tokens=64, threads=2, jit=False).precision != "bf16":
        pytest.skip("CPU without bf16: training features were fp32, covered above")
    bf16 = MiniLMEncoder(max_tokens=64, precision="bf16", threads=2)
    _, ref = bf16.encode_features(TEXTS)
    _, feat = fast.encode_features(TEXTS)
    # bf16 keeps 8 bits of mantissa: differences are bf16 rounding, not a different model.
    assert np.abs(feat - ref).max() <= 2e-2 * np.abs(ref).max()


def test_parallel_chunks_keep_input_order(fast: MiniLMEncoder) -> None:
    texts = [f"Question {i}: " + "why " * (i * 7 % 40) + "?" for i in range(24)]
    _, together = fast.encode_features(texts)
    one_by_one = np.concatenate([fast.encode_features([t])[1] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-4 * np.abs(one_by_one).max())


def test_hybrid_matches_torch_on_batches_and_onnx_on_one_prompt(
    torch_fp32: MiniLMEncoder, fast: MiniLMEncoder
) -> None:
    hybrid = MiniLMEncoder(max_tokens=64, threads=2, backend="hybrid")
    texts = [f"Question {i}: " + "why " * (i * 5 % 50) + "?" for i in range(16)]
    _, batch = hybrid.encode_features(texts, batch_size=4)  # several chunks: the torch engine
    _, ref = torch_fp32.encode_features(texts)
    tolerance = 2e-2 if hybrid.precision == "bf16" else 1e-4
    assert np.abs(batch - ref).max() <= tolerance * np.abs(ref).max()
    _, one = hybrid.encode_features(texts[:1])  # one chunk: the ONNX fp32 engine
    _, one_ref = fast.encode_features(texts[:1])
    np.testing.assert_allclose(one, one_ref, atol=1e-5 * np.abs(one_ref).max(), rtol=0)
    assert hybrid.cache_tag.startswith("hybrid-")


def test_graph_is_cached_by_weights(fast: MiniLMEncoder) -> None:
    file = fast._onnx.file
    mtime = file.stat().st_mtime_ns
    again = MiniLMEncoder(max_tokens=64, threads=1, backend="onnx")
    assert again._onnx.file == file
    assert file.stat().st_mtime_ns == mtime  # not exported a second time
    assert "onnx" in again.cache_tag and fast.cache_tag == again.cache_tag


def test_int8_gives_a_prompt_the_same_features_alone_and_in_any_batch() -> None:
    # Dynamic quantisation scales activations by the whole input: batched runs would
    # make a prompt's prediction depend on its batch-mates. Each prompt runs alone.
    int8 = MiniLMEncoder(max_tokens=64, threads=2, backend="onnx-int8")
    texts = [f"Question {i}: " + "why " * (i * 7 % 40) + "?" for i in range(12)] + TEXTS
    emb, together = int8.encode_features(texts, batch_size=64)
    for i in (0, 5, len(texts) - 1):
        e, alone = int8.encode_features([texts[i]])
        np.testing.assert_array_equal(alone[0], together[i])
        np.testing.assert_array_equal(e[0], emb[i])
    _, reversed_batch = int8.encode_features(texts[::-1], batch_size=3)
    np.testing.assert_array_equal(reversed_batch[::-1], together)
    assert int8.cache_tag.startswith("onnx-int8-rows1-")


def test_int8_features_stay_near_the_bf16_training_features() -> None:
    # Loose on purpose: int8 weights move features a few percent; the model card gives
    # the held-out tau both ways. This catches a broken graph (wrong layer, no pooling).
    int8 = MiniLMEncoder(max_tokens=64, threads=2, backend="onnx-int8")
    ref_encoder = MiniLMEncoder(max_tokens=64, threads=2, jit=False)
    _, ref = ref_encoder.encode_features(TEXTS)
    _, feat = int8.encode_features(TEXTS)
    relative = np.linalg.norm(feat - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert relative.max() < 0.2  # measured 0.08-0.14
    # Each prompt is still nearest to its own training-time features.
    distances = np.linalg.norm(feat[:, None] - ref[None], axis=2)
    assert list(distances.argmin(axis=1)) == list(range(len(TEXTS)))


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt")
    assert resolve_backend("auto") == "onnx-int8"
