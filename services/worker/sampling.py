"""Sampling parameters as the vLLM backend receives them (a JSON string).

The worker validates the same limits before it calls Triton, so that a bad
request fails with INVALID_ARGUMENT naming the field instead of a Triton error.
Both sides use this module: the servicer (``service/servicer.py``) validates,
the embedded models (``triton/python_model.py``) parse. The ranges are
``shortline.common.limits``' (the scheduler checks the same ones at admission).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shortline.common import limits


@dataclass(frozen=True)
class SamplingParams:
    """The subset of vLLM's SamplingParams that the embedded models honour; vLLM's defaults."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1 (vLLM's spelling) disables top-k.
    top_k: int = -1
    ignore_eos: bool = False
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    repetition_penalty: float = 1.0


def validate(params: SamplingParams, max_tokens_limit: int) -> None:
    """Raises ValueError whose message names the offending field."""
    if not 1 <= params.max_tokens <= max_tokens_limit:
        raise ValueError(f"max_tokens must be 1..{max_tokens_limit}, got {params.max_tokens}")
    problem = limits.check_sampling(
        limits.ModelLimits(""),
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        stop=params.stop,
        seed=params.seed,
    )
    if problem is not None:
        raise ValueError(problem)


def _typed(obj: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is bool and isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def parse(text: str | bytes, max_tokens_limit: int) -> SamplingParams:
    """Parses and validates ``sampling_parameters`` (vLLM accepts numbers as strings too)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        obj = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"sampling_parameters is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError("sampling_parameters must be a JSON object")
    stop = obj.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    seed = obj.get("seed")
    params = SamplingParams(
        max_tokens=_typed(obj, "max_tokens", int, 16),
        temperature=_typed(obj, "temperature", float, 1.0),
        top_p=_typed(obj, "top_p", float, 1.0),
        top_k=_typed(obj, "top_k", int, -1),
        ignore_eos=_typed(obj, "ignore_eos", bool, False),
        stop=tuple(stop),
        seed=None if seed is None else _typed(obj, "seed", int, None),
        repetition_penalty=_typed(obj, "repetition_penalty", float, 1.0),
    )
    validate(params, max_tokens_limit)
    return params
