"""The worker reads Triton's streamed responses from their raw bytes (triton_client.py):
every datatype our models and Triton's vLLM backend send, read as tritonclient read it."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from services.worker.service.triton_client import parse_response, stream_request


def _response(
    outputs: dict[str, np.ndarray], final: bool = False
) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="m", id="r")
    for name, array in outputs.items():
        if array.dtype == np.object_:
            datatype, raw = "BYTES", serialize_byte_tensor(array).item()
        else:
            datatype = {"uint32": "UINT32", "uint64": "UINT64", "int32": "INT32", "bool": "BOOL"}[
                str(array.dtype)
            ]
            raw = array.tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(raw)
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return response


@pytest.mark.parametrize("text", ["", " hello", "é😀 naïve", "x" * 5000])
def test_text_counts_reasons_and_steps_read_as_tritonclient_reads_them(text: str) -> None:
    response = _response(
        {
            "text_output": np.array([text.encode()], dtype=np.object_),
            "num_output_tokens": np.array([7], dtype=np.uint32),
            "finish_reason": np.array([b"length"], dtype=np.object_),
            "step": np.array([2**40 + 3], dtype=np.uint64),
            "batch_size": np.array([12], dtype=np.uint32),
            "num_input_tokens": np.array([301], dtype=np.uint32),
        },
        final=True,
    )
    chunk = parse_response(response)
    reference = InferResult(response)
    assert chunk.text == reference.as_numpy("text_output")[0].decode()
    assert chunk.tokens == int(reference.as_numpy("num_output_tokens")[0]) == 7
    assert chunk.finish_reason == "length"
    assert chunk.step == 2**40 + 3 and chunk.batch_size == 12
    assert chunk.prompt_tokens == int(reference.as_numpy("num_input_tokens")[0]) == 301
    assert chunk.final


def test_a_model_without_the_optional_outputs_counts_a_token_per_text() -> None:
    """Triton's vLLM backend sends only text_output unless asked for more."""
    chunk = parse_response(_response({"text_output": np.array([b" a"], dtype=np.object_)}))
    assert (chunk.text, chunk.tokens, chunk.step, chunk.finish_reason, chunk.final) == (
        " a",
        1,
        0,
        "",
        False,
    )
    empty = parse_response(_response({"text_output": np.array([b""], dtype=np.object_)}, True))
    assert (empty.text, empty.tokens, empty.final) == ("", 0, True)
    assert chunk.prompt_tokens == empty.prompt_tokens == 0  # not reported


def test_truncated_or_unknown_outputs_are_not_read_past_their_bytes() -> None:
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(b"\x10\x00\x00\x00abc")  # says 16 bytes, has 3
    response.outputs.add(name="num_output_tokens", datatype="UINT32", shape=[1])
    response.raw_output_contents.append(b"\x01")  # too short for a UINT32
    response.outputs.add(name="step", datatype="FP32", shape=[1])  # not an integer type
    response.raw_output_contents.append(b"\x00\x00\x80\x3f")
    chunk = parse_response(response)
    assert (chunk.text, chunk.tokens, chunk.step) == ("abc", 1, 0)


def test_a_request_carries_each_input_as_one_raw_element() -> None:
    request = stream_request(
        "replay",
        "job-1",
        [("text_input", "BYTES", b"\x02\x00\x00\x00hi"), ("stream", "BOOL", b"\x01")],
    )
    assert request.model_name == "replay" and request.id == "job-1"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("text_input", "BYTES", [1]),
        ("stream", "BOOL", [1]),
    ]
    assert list(request.raw_input_contents) == [b"\x02\x00\x00\x00hi", b"\x01"]
