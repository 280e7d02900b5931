"""Truncation keeps [CLS], the prompt's head and tail, and [SEP]; embeddings are unit 384-d."""

from __future__ import annotations

import numpy as np
import pytest

from services.predictor.features.minilm import MiniLMEncoder, wrap_truncated
from services.predictor.features.minilm_backends import EMBEDDING_DIM, length_chunks

CLS, SEP = 101, 102


def test_short_prompt_is_wrapped_in_cls_and_sep() -> None:
    assert wrap_truncated([5, 6, 7], 10, CLS, SEP) == [CLS, 5, 6, 7, SEP]


def test_long_prompt_keeps_cls_head_tail_and_sep() -> None:
    ids = list(range(1000, 1100))
    out = wrap_truncated(ids, 12, CLS, SEP)
    assert len(out) == 12
    assert out[0] == CLS and out[-1] == SEP
    assert out[1:6] == ids[:5]  # head gets the larger half of the 10-token budget
    assert out[6:11] == ids[-5:]


def test_odd_budget_gives_head_the_extra_token() -> None:
    out = wrap_truncated(list(range(50)), 7, CLS, SEP)
    assert out == [CLS, 0, 1, 2, 48, 49, SEP]


def test_too_small_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        wrap_truncated([1], 2, CLS, SEP)


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder(max_tokens=32, threads=1)


def test_real_tokenizer_truncation_keeps_the_question_at_the_end(encoder: MiniLMEncoder) -> None:
    text = "Summarise this. " + "filler words " * 200 + "Answer in one word."
    ids = encoder.token_ids([text])[0]
    assert len(ids) == 32
    assert ids[0] == encoder.cls_id and ids[-1] == encoder.sep_id
    decoded = encoder.tokenizer.decode(ids[1:-1])
    assert decoded.startswith("summarise this")
    assert decoded.endswith("answer in one word.")


def test_embeddings_are_normalised_and_order_preserving(encoder: MiniLMEncoder) -> None:
    texts = ["Write a poem about the sea.", "What is 2+2?", "List three primes."]
    batch = encoder.encode(texts)
    assert batch.shape == (3, EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-4)
    single = encoder.encode([texts[1]])
    np.testing.assert_allclose(single[0], batch[1], atol=2e-2)


def test_length_chunks_group_similar_lengths_within_the_budget() -> None:
    lengths = [5, 200, 6, 7, 190, 8]
    chunks = length_chunks(lengths, max_rows=64, token_budget=400)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    for chunk in chunks:
        assert len(chunk) * max(lengths[i] for i in chunk) <= 400 or len(chunk) == 1
    assert chunks[0] == [0, 2, 3, 5]
    assert length_chunks(lengths, max_rows=2, token_budget=10_000)[0] == [0, 2]


def test_traced_forward_equals_eager_on_a_padded_batch(encoder: MiniLMEncoder) -> None:
    import torch

    texts = ["Hi.", "Write a long story about a lighthouse keeper and a storm at sea."]
    rows = encoder.token_ids(texts)
    assert len(rows[0]) < len(rows[1])  # the short row is padded
    assert encoder._traced is not None
    with torch.inference_mode():
        traced_emb, traced_feat = encoder.forward_ids(rows)
    with torch.no_grad(), torch.enable_grad():
        eager_emb, eager_feat = encoder.forward_ids(rows)
    np.testing.assert_allclose(traced_emb.numpy(), eager_emb.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(traced_feat.numpy(), eager_feat.detach().numpy(), atol=1e-4)
