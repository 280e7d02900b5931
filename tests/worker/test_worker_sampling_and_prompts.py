"""What the worker accepts before it calls Triton: vLLM sampling parameters (fields
named in errors, vLLM's spellings) and per-model prompt formats."""

from __future__ import annotations

import pytest

from services.worker.prompts import format_prompt, parse_models
from services.worker.sampling import SamplingParams, parse


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"max_tokens": 0}', "max_tokens"),
        ('{"max_tokens": 10, "temperature": -1}', "temperature"),
        ('{"max_tokens": 10, "top_p": 0}', "top_p"),
        ('{"max_tokens": 10, "top_k": -5}', "top_k"),
        ('{"max_tokens": 10, "stop": [""]}', "stop"),
        ('{"max_tokens": "ten"}', "max_tokens"),
        ("[1, 2]", "sampling_parameters"),
        ("{", "sampling_parameters"),
    ],
)
def test_invalid_sampling_parameters_name_the_field(body: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        parse(body, max_tokens_limit=100)


def test_sampling_parameters_accept_vllm_spellings() -> None:
    p = parse('{"max_tokens": "7", "temperature": "0", "stop": "###", "ignore_eos": "true"}', 100)
    assert p == SamplingParams(max_tokens=7, temperature=0.0, stop=("###",), ignore_eos=True)


def test_prompt_format_appends_resume_text_after_the_template() -> None:
    text = format_prompt("smollm2", "Hi", "Hello! How")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How")
    assert format_prompt("raw", "p", " replay3") == "p replay3"


def test_models_spec_parses_format_and_limit() -> None:
    models = parse_models("a=smollm2:100,b=raw:5,c")
    assert (models["a"].prompt_format, models["a"].max_tokens) == ("smollm2", 100)
    assert models["c"].prompt_format == "raw"
    with pytest.raises(ValueError, match="prompt format"):
        parse_models("a=nope:1")
