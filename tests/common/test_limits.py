"""The one copy of limits and sampling ranges: values the engines cannot handle
(denormals, nan, inf) are refused with a message naming the field, float32 proto
values at a bound pass, and a worker can only narrow the outer bounds."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.worker.sampling import SamplingParams
from services.worker.sampling import validate as worker_validate
from shortline.common.labels import OTHER, KnownNames, bounded
from shortline.common.limits import (
    MAX_PROMPT_CHARS,
    MAX_TOKENS,
    MIN_TEMPERATURE,
    ModelLimits,
    check_sampling,
    narrowest,
    validate,
)
from shortline.common.v1 import common_pb2
from shortline.scheduler.v1 import scheduler_pb2

DENORMAL = 1.4e-45  # the smallest float32 denormal
LIMITS = ModelLimits("m", max_tokens=100, max_prompt_chars=50)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"temperature": DENORMAL}, "temperature"),
        ({"temperature": 1e-30}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 1e30}, "temperature"),
        ({"repetition_penalty": DENORMAL}, "repetition_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"repetition_penalty": 11.0}, "repetition_penalty"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": DENORMAL}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"stop": ["y" * 257]}, "stop[0]"),
    ],
)
def test_out_of_range_sampling_is_refused_naming_the_field(
    fields: dict[str, Any], named: str
) -> None:
    sampling = common_pb2.SamplingParams(**fields)
    problem = validate(sampling, 10, "hello", LIMITS)
    assert problem is not None and problem.startswith(named + " ")
    # The worker's own check (its JSON path too) holds the same ranges.
    with pytest.raises(ValueError, match=named.split("[")[0]):
        worker_validate(SamplingParams(max_tokens=10, **_worker_fields(fields)), 100)


def _worker_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "stop" in out:
        out["stop"] = tuple(out["stop"])
    return out


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"temperature": 0.0},  # greedy
        {"temperature": MIN_TEMPERATURE},  # float32 0.01 is a hair below 0.01: still in
        {"temperature": 100.0, "top_p": 1e-6, "top_k": 0},
        {"repetition_penalty": 0.01, "seed": 2**63 - 1, "stop": ["a" * 256] * 16},
    ],
)
def test_values_at_the_bounds_pass(fields: dict[str, Any]) -> None:
    sampling = common_pb2.SamplingParams(**fields)
    assert validate(sampling, 100, "hello", LIMITS) is None
    worker_validate(SamplingParams(max_tokens=10, **_worker_fields(fields)), 100)


def test_prompt_and_max_tokens_are_checked_against_the_model_without_echoing_the_prompt() -> None:
    sampling = common_pb2.SamplingParams()
    secret = "password hunter2 " * 4
    problem = validate(sampling, 10, secret, LIMITS)
    assert problem is not None and "max_prompt_chars" in problem and str(len(secret)) in problem
    assert "hunter2" not in problem
    assert validate(sampling, 10, "", LIMITS) == "prompt must not be empty"
    problem = validate(sampling, 101, "hi", LIMITS)
    assert problem is not None and problem.startswith("max_tokens must be 1..100")
    assert validate(sampling, 0, "hi", LIMITS) is not None


def test_proto_round_trip_and_workers_only_narrow_the_outer_bounds() -> None:
    limits = ModelLimits("m", max_tokens=512, max_prompt_chars=1000, max_temperature=2.0)
    # float32 on the wire (0.01 comes back a hair below): the outer bound restores it.
    assert ModelLimits.from_proto(limits.to_proto(scheduler_pb2.ModelLimits)) == limits
    # An older worker (nothing advertised) gets the defaults; a wider or broken range
    # (65536 tokens, a denormal temperature floor, nan) is clamped to the outer bounds.
    assert ModelLimits.from_proto(scheduler_pb2.ModelLimits(model="m")) == ModelLimits("m")
    wide = ModelLimits.from_proto(
        scheduler_pb2.ModelLimits(
            model="m",
            max_tokens=65536,
            min_temperature=DENORMAL,
            max_temperature=math.nan,
            max_prompt_chars=10**9,
        )
    )
    assert wide.max_tokens == MAX_TOKENS and wide.max_prompt_chars == MAX_PROMPT_CHARS
    assert wide.min_temperature == MIN_TEMPERATURE and wide.max_temperature == 100.0
    # Several workers: the most restrictive of each.
    both = narrowest(
        "m",
        [
            ModelLimits("m", max_tokens=100, max_stop_strings=4),
            ModelLimits("m", max_tokens=200, min_repetition_penalty=0.5),
        ],
    )
    assert (both.max_tokens, both.max_stop_strings, both.min_repetition_penalty) == (100, 4, 0.5)
    assert narrowest("m", []) == ModelLimits("m")


def test_check_sampling_uses_the_models_narrower_ranges() -> None:
    narrow = ModelLimits("m", max_temperature=2.0, max_stop_strings=1)
    assert check_sampling(narrow, temperature=2.5) == (
        "temperature must be 0 (greedy) or 0.01..2, got 2.5"
    )
    assert (check_sampling(narrow, stop=["a", "b"]) or "").startswith("stop must hold at most 1")


def test_label_values_come_from_known_names_only() -> None:
    assert bounded("replay", {"replay"}) == "replay"
    assert bounded("x" * 1000, {"replay"}) == OTHER
    names = KnownNames(["a"], limit=3)
    names.add(["b", "c", "d", "e"])
    assert sorted(names) == ["a", "b", "c"] and names.label("d") == OTHER
    assert names.label("b") == "b"
