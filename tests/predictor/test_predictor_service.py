"""PredictorService over a real gRPC socket: batches, cards, health, every bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hidden_data import shared_data_hidden

from services.predictor.config import PredictorConfig
from services.predictor.features.minilm_backends import resolve_backend
from services.predictor.heads import SHIPPED_HEADS_DIR
from services.predictor.service import SERVICE_NAME, PredictorServer
from shortline.common.net import free_port
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

pytestmark = pytest.mark.slow

TARGET = "Meta-Llama-3-8B-Instruct"
PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a detailed, multi-section essay on the causes of the First World War.",
    "Give me three synonyms for happy.",
]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def address() -> AsyncIterator[str]:
    cfg = PredictorConfig(port=free_port(), batch_window_ms=5.0, threads=2)
    server = PredictorServer(cfg)
    # The service runs on the shipped artifacts alone: hide the shared data while it loads.
    with shared_data_hidden():
        await server.start()
    try:
        yield cfg.address
    finally:
        await server.stop(0.5)


@pytest_asyncio.fixture(loop_scope="session")
async def stub(address: str) -> AsyncIterator[predictor_pb2_grpc.PredictorServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield predictor_pb2_grpc.PredictorServiceStub(channel)


def card(target: str) -> dict:  # type: ignore[type-arg]
    return json.loads((SHIPPED_HEADS_DIR / target / "card.json").read_text())


async def test_predict_returns_one_result_per_prompt_in_order(
    stub: predictor_pb2_grpc.PredictorServiceStub,
) -> None:
    response = await stub.Predict(
        predictor_pb2.PredictRequest(target_model=TARGET, prompts=PROMPTS, return_embedding=True)
    )
    assert len(response.predictions) == len(PROMPTS)
    assert response.target_model == TARGET
    c = card(TARGET)
    default = c["default_head"]
    assert response.head_version == c["heads"][default]["version"]
    assert list(response.bucket_boundaries) == pytest.approx(c["bucket_boundaries"])
    for p in response.predictions:
        assert p.predicted_tokens >= 1.0
        assert len(p.embedding) == 384
        assert 0 <= p.bucket <= 4
    # The essay asks for far more text than the one-word answer.
    assert response.predictions[1].predicted_tokens > response.predictions[0].predicted_tokens
    singles = [
        await stub.Predict(predictor_pb2.PredictRequest(target_model=TARGET, prompts=[p]))
        for p in PROMPTS
    ]
    # The default backend (onnx-int8) runs every prompt alone: the same features, bit
    # for bit, whatever a prompt is batched with; only the head's float32 matrix product
    # rounds differently for 1 or 3 rows. The torch fallback pads batches in bf16.
    exact = resolve_backend("auto") == "onnx-int8"
    for one, batched in zip(singles, response.predictions, strict=True):
        if exact:
            assert one.predictions[0].predicted_tokens == pytest.approx(
                batched.predicted_tokens, rel=1e-5
            )
            assert one.predictions[0].score == pytest.approx(batched.score, rel=1e-5)
        else:
            assert one.predictions[0].predicted_tokens == pytest.approx(
                batched.predicted_tokens, rel=0.05
            )


async def test_classification_head_returns_bucket_probabilities(
    stub: predictor_pb2_grpc.PredictorServiceStub,
) -> None:
    response = await stub.Predict(
        predictor_pb2.PredictRequest(
            target_model=TARGET, prompts=PROMPTS[:1], head=predictor_pb2.HEAD_KIND_CLASSIFICATION
        )
    )
    assert response.head == predictor_pb2.HEAD_KIND_CLASSIFICATION
    assert response.head_version == card(TARGET)["heads"]["cls"]["version"]
    probs = list(response.predictions[0].bucket_probabilities)
    assert len(probs) == 5 and sum(probs) == pytest.approx(1.0, abs=1e-5)


async def test_concurrent_requests_share_encoder_passes(
    stub: predictor_pb2_grpc.PredictorServiceStub,
) -> None:
    requests = [
        stub.Predict(predictor_pb2.PredictRequest(target_model=TARGET, prompts=[p]))
        for p in PROMPTS * 4
    ]
    responses = await asyncio.gather(*requests)
    assert [len(r.predictions) for r in responses] == [1] * 12


async def test_list_models_names_every_shipped_target(
    stub: predictor_pb2_grpc.PredictorServiceStub,
) -> None:
    response = await stub.ListModels(predictor_pb2.ListModelsRequest())
    shipped = sorted(p.parent.name for p in SHIPPED_HEADS_DIR.glob("*/card.json"))
    assert [m.target_model for m in response.models] == shipped
    assert "MiniLM" in response.encoder
    llama = next(m for m in response.models if m.target_model == TARGET)
    assert "SmolLM2" in llama.tokenizer
    assert len(llama.bucket_boundaries) == 4
    versions = {h.kind: h.version for h in llama.heads}
    assert versions[predictor_pb2.HEAD_KIND_RANKING] == card(TARGET)["heads"]["rank"]["version"]
    assert all("kendall_tau" in h.metrics for h in llama.heads)


async def test_health_is_serving_and_reflection_lists_the_service(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names: list[str] = []
        async for response in reflect.ServerReflectionInfo(one()):
            names = [s.name for s in response.list_services_response.service]
        assert SERVICE_NAME in names


@pytest.mark.parametrize(
    ("request_kwargs", "code", "needle"),
    [
        ({"target_model": "", "prompts": ["hi"]}, grpc.StatusCode.NOT_FOUND, "known:"),
        ({"target_model": "gpt-9", "prompts": ["hi"]}, grpc.StatusCode.NOT_FOUND, "gpt-9"),
        ({"target_model": TARGET, "prompts": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
        (
            {"target_model": TARGET, "prompts": ["x"] * 257},
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 256",
        ),
        (
            {"target_model": TARGET, "prompts": ["ok", ""]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompts[1]",
        ),
        ({"target_model": TARGET, "prompts": ["hi"], "head": 9}, grpc.StatusCode.NOT_FOUND, "9"),
    ],
)
async def test_bad_input_gets_a_status_that_names_the_problem(
    stub: predictor_pb2_grpc.PredictorServiceStub,
    request_kwargs: dict,  # type: ignore[type-arg]
    code: grpc.StatusCode,
    needle: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(predictor_pb2.PredictRequest(**request_kwargs))
    assert err.value.code() == code
    assert needle in (err.value.details() or "")
    if "known:" in needle or "gpt-9" in needle:
        assert TARGET in (err.value.details() or "")
