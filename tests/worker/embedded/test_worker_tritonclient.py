"""The embedded models answer a client we did not write: tritonclient's own
synchronous gRPC streaming API, exactly as one would call a vLLM model."""

from __future__ import annotations

import json
import queue
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

pytestmark = pytest.mark.slow


def _inputs(text: str, params: dict[str, Any]) -> list[grpcclient.InferInput]:
    text_input = grpcclient.InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=np.object_))
    return [text_input, stream, sampling]


def _generate(url: str, model: str, text: str, params: dict[str, Any]) -> list[str]:
    results: queue.Queue[Any] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(
            model, _inputs(text, params), request_id="r1", enable_empty_final_response=True
        )
        texts: list[str] = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            out = result.as_numpy("text_output")
            if out is not None:
                texts.append(out[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return texts
    finally:
        client.stop_stream()
        client.close()


def test_tritonclient_streams_exactly_max_tokens_from_replay(embedded_triton: Any) -> None:
    texts = _generate(embedded_triton.grpc_url, "replay", "hello", {"max_tokens": 7})
    assert "".join(texts) == "".join(f" replay{i}" for i in range(1, 8))


def test_tritonclient_streams_text_from_smollm2(embedded_triton: Any) -> None:
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    texts = _generate(
        embedded_triton.grpc_url,
        "smollm2-135m-instruct",
        prompt,
        {"max_tokens": 12, "temperature": 0},
    )
    assert len(texts) >= 2  # streamed, not one block
    assert "Paris" in "".join(texts)


def test_tritonclient_sees_the_model_config_says_replay_replays(embedded_triton: Any) -> None:
    client = grpcclient.InferenceServerClient(embedded_triton.grpc_url)
    try:
        config = client.get_model_config("replay", as_json=True)["config"]
    finally:
        client.close()
    assert (
        "Replays output lengths; generates no text"
        in (config["parameters"]["description"]["string_value"])
    )
    assert config["model_transaction_policy"]["decoupled"] is True
