"""The ONNX Runtime fast path computes the torch path's features (so the heads' tau holds)."""

from __future__ import annotations

import numpy as np
import pytest

from services.predictor import onnx_backend
from services.predictor.encoder import Encoder, resolve_backend

pytestmark = pytest.mark.skipif(not onnx_backend.available(), reason="onnxruntime not installed")

TEXTS = [
    "What is 2+2?",
    "Write a poem about the sea.",
    "Summarise this. " + "filler words " * 120 + "Answer in one word.",
    "List three primes and explain why each is prime, in detail, for a child.",
    "Hi",
    "Translate 'good morning' into French, German, Spanish and Italian.",
]


@pytest.fixture(scope="module")
def torch_fp32() -> Encoder:
    # Eager fp32: the reference the graph was exported from.
    return Encoder(max_tokens=64, precision="fp32", threads=2, jit=False)


@pytest.fixture(scope="module")
def fast() -> Encoder:
    return Encoder(max_tokens=64, threads=2, backend="onnx")


def test_onnx_features_match_torch_fp32(torch_fp32: Encoder, fast: Encoder) -> None:
    ref_emb, ref_feat = torch_fp32.encode_features(TEXTS)
    emb, feat = fast.encode_features(TEXTS)
    assert feat.shape == ref_feat.shape == (len(TEXTS), fast.feature_dim)
    scale = np.abs(ref_feat).max()
    np.testing.assert_allclose(feat, ref_feat, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-4, rtol=0)


def test_onnx_features_match_the_bf16_features_heads_were_trained_on(fast: Encoder) -> None:
    if Encoder(max_tokens=64, threads=2, jit=False).precision != "bf16":
        pytest.skip("CPU without bf16: training features were fp32, covered above")
    bf16 = Encoder(max_tokens=64, precision="bf16", threads=2)
    _, ref = bf16.encode_features(TEXTS)
    _, feat = fast.encode_features(TEXTS)
    # bf16 keeps 8 bits of mantissa: differences are bf16 rounding, not a different model.
    assert np.abs(feat - ref).max() <= 2e-2 * np.abs(ref).max()


def test_parallel_chunks_keep_input_order(fast: Encoder) -> None:
    texts = [f"Question {i}: " + "why " * (i * 7 % 40) + "?" for i in range(24)]
    _, together = fast.encode_features(texts)
    one_by_one = np.concatenate([fast.encode_features([t])[1] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-4 * np.abs(one_by_one).max())


def test_hybrid_matches_torch_on_batches_and_onnx_on_one_prompt(
    torch_fp32: Encoder, fast: Encoder
) -> None:
    hybrid = Encoder(max_tokens=64, threads=2, backend="hybrid")
    texts = [f"Question {i}: " + "why " * (i * 5 % 50) + "?" for i in range(16)]
    _, batch = hybrid.encode_features(texts, batch_size=4)  # several chunks: the torch engine
    _, ref = torch_fp32.encode_features(texts)
    tolerance = 2e-2 if hybrid.precision == "bf16" else 1e-4
    assert np.abs(batch - ref).max() <= tolerance * np.abs(ref).max()
    _, one = hybrid.encode_features(texts[:1])  # one chunk: the ONNX fp32 engine
    _, one_ref = fast.encode_features(texts[:1])
    np.testing.assert_allclose(one, one_ref, atol=1e-5 * np.abs(one_ref).max(), rtol=0)
    assert hybrid.cache_tag.startswith("hybrid-")


def test_graph_is_cached_by_weights(fast: Encoder) -> None:
    file = fast._onnx.file
    mtime = file.stat().st_mtime_ns
    again = Encoder(max_tokens=64, threads=1, backend="onnx")
    assert again._onnx.file == file
    assert file.stat().st_mtime_ns == mtime  # not exported a second time
    assert "onnx" in again.cache_tag and fast.cache_tag == again.cache_tag


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt")
    assert resolve_backend("auto") == "hybrid"
