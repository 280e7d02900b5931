"""The completions body check alone (no stack): neutral values pass, anything else that
the scheduler cannot honour is a 400 naming it."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway.errors import ApiError
from services.gateway.params import DEFAULT_MAX_TOKENS, parse_completion

BASE = {"model": "replay", "prompt": "go"}


def parse(**fields: Any) -> Any:
    return parse_completion({**BASE, **fields}, max_deadline_s=60.0)


def test_mapped_fields_and_neutral_values_pass() -> None:
    p = parse(
        max_tokens=7,
        temperature=0,
        top_p=0.9,
        seed=3,
        stop=["\n"],
        n=1,
        user="u",
        echo=False,
        best_of=1,
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
        logprobs=None,
        suffix=None,
        stream=True,
        stream_options={"include_usage": True},
        priority=2,
        deadline_seconds=5,
        length_model="m",
    )
    assert (p.max_tokens, p.temperature, p.seed, p.stop, p.include_usage) == (
        7,
        0.0,
        3,
        ("\n",),
        True,
    )
    assert p.priority == 2 and p.deadline_seconds == 5.0 and p.length_model == "m"
    assert parse(prompt=["one"]).prompt == "one"
    assert parse().max_tokens == DEFAULT_MAX_TOKENS and parse(stop="x").stop == ("x",)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"best_of": True}, "best_of"),  # True == 1, yet not a count
        ({"echo": 0}, "echo"),
        ({"logprobs": 0}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"model": ""}, "model"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"other": 1}}, "stream_options.other"),
        ({"deadline_seconds": 61}, "deadline_seconds"),
        ({"length_hint": 0}, "length_hint"),
        ({"length_hint": 2.5}, "length_hint"),
        ({"tools": []}, "tools"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse(**fields)
    assert caught.value.status == 400
    assert caught.value.body()["error"]["param"] == param
