"""What a request may ask of a model: one copy of every limit and sampling range.

Workers advertise a :class:`ModelLimits` per served model when they register
(``RegisterWorkerRequest.limits``); the scheduler checks each request against
the most restrictive limits of the workers serving its model before it sends
``Accepted``, and lists them (``SchedulerService.ListModels``). The worker
checks the same ranges again (its JSON ``sampling_parameters`` path included),
so a request that reaches a worker some other way is held to the same rules.

The defaults are also the outer bounds: a worker may advertise narrower limits,
never wider ones (``narrow``). The sampling ranges are those every engine here
handles without inf or nan: a temperature of 1.4e-45 (a float32 denormal)
divides logits into infinities, so temperature is 0 (greedy) or at least
``MIN_TEMPERATURE``; a repetition penalty likewise. top_p, top_k and seed are
the same for every model (``ModelLimits`` has no field for them).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol, TypeVar

from shortline.common.v1 import common_pb2

MAX_TOKENS = 8192
MAX_PROMPT_CHARS = 65536
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0
# Below this a cumulative float32 sum cannot tell the nucleus from rounding noise.
MIN_TOP_P = 1e-6
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**63
# Model and length-model names (they end up in logs, traces and the outcome log).
MAX_NAME_CHARS = 128


M = TypeVar("M")


class LimitsMessage(Protocol):
    """``shortline.scheduler.v1.ModelLimits`` as this module reads it (shared code does
    not import the scheduler's contract: the generated package imports this one)."""

    model: str
    max_tokens: int
    max_prompt_chars: int
    min_temperature: float
    max_temperature: float
    min_repetition_penalty: float
    max_repetition_penalty: float
    max_stop_strings: int
    max_stop_chars: int
    length_model: str


def _f32(x: float) -> float:
    """``x`` as the float32 a proto field holds: a bound compared with a proto value
    must be rounded the same way, or 0.01 sent as float32 would be below 0.01."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


@dataclass(frozen=True)
class ModelLimits:
    """Mirrors ``shortline.scheduler.v1.ModelLimits``; the defaults are the outer bounds."""

    model: str
    max_tokens: int = MAX_TOKENS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    min_temperature: float = MIN_TEMPERATURE
    max_temperature: float = MAX_TEMPERATURE
    min_repetition_penalty: float = MIN_REPETITION_PENALTY
    max_repetition_penalty: float = MAX_REPETITION_PENALTY
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_chars: int = MAX_STOP_CHARS
    # The predictor head for requests naming no length_model; "": the scheduler's default.
    # Not a limit: it passes through ``narrow`` unchanged (the first worker's that has one).
    length_model: str = ""

    def to_proto(self, message_type: Callable[..., M]) -> M:
        """As a message of ``message_type`` (``scheduler_pb2.ModelLimits``)."""
        return message_type(**asdict(self))

    @classmethod
    def from_proto(cls, message: LimitsMessage) -> ModelLimits:
        """The advertised limits within the outer bounds; an unset (zero) or non-finite
        field keeps the default, so an older or careless worker cannot widen a range."""
        defaults = cls(message.model, length_model=message.length_model)
        advertised: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(message, f.name)
            if f.name not in _NAMES and value and math.isfinite(value):
                advertised[f.name] = value
        return narrow(defaults, replace(defaults, **advertised))


_NAMES = frozenset({"model", "length_model"})


def narrow(a: ModelLimits, b: ModelLimits) -> ModelLimits:
    """The most restrictive of two limits of one model (several workers, or a worker
    and the outer bounds): the smaller maximum, the larger minimum; ``a``'s length
    model, else ``b``'s (the scheduler refuses a worker that maps a model elsewhere)."""
    return ModelLimits(
        model=a.model,
        length_model=a.length_model or b.length_model,
        max_tokens=min(a.max_tokens, b.max_tokens),
        max_prompt_chars=min(a.max_prompt_chars, b.max_prompt_chars),
        min_temperature=max(a.min_temperature, b.min_temperature),
        max_temperature=min(a.max_temperature, b.max_temperature),
        min_repetition_penalty=max(a.min_repetition_penalty, b.min_repetition_penalty),
        max_repetition_penalty=min(a.max_repetition_penalty, b.max_repetition_penalty),
        max_stop_strings=min(a.max_stop_strings, b.max_stop_strings),
        max_stop_chars=min(a.max_stop_chars, b.max_stop_chars),
    )


def narrowest(model: str, limits: Iterable[ModelLimits]) -> ModelLimits:
    """The most restrictive of ``limits`` (defaults when there are none)."""
    out = ModelLimits(model)
    for item in limits:
        out = narrow(out, item)
    return out


def max_message_bytes(max_prompt_chars: int) -> int:
    """A gRPC message limit for requests carrying at most this many prompt characters:
    4 UTF-8 bytes per character, plus room for the other fields."""
    return 4 * max_prompt_chars + 65536


def _in(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and _f32(low) <= value <= _f32(high)


def check_sampling(
    limits: ModelLimits,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> str | None:
    """What is wrong with these sampling values, naming the field; None when valid.

    The one check of sampling ranges: the scheduler's admission (through
    :func:`validate`) and the worker's ``sampling.validate`` both call it."""
    lo_t, hi_t = limits.min_temperature, limits.max_temperature
    if not (temperature == 0.0 or _in(temperature, lo_t, hi_t)):
        return f"temperature must be 0 (greedy) or {lo_t:g}..{hi_t:g}, got {temperature:g}"
    if not _in(top_p, MIN_TOP_P, 1.0):
        return f"top_p must be {MIN_TOP_P:g}..1, got {top_p:g}"
    if top_k < -1:
        return f"top_k must be -1, 0 (both disable it) or positive, got {top_k}"
    lo_r, hi_r = limits.min_repetition_penalty, limits.max_repetition_penalty
    if not _in(repetition_penalty, lo_r, hi_r):
        return f"repetition_penalty must be {lo_r:g}..{hi_r:g}, got {repetition_penalty:g}"
    if len(stop) > limits.max_stop_strings:
        return f"stop must hold at most {limits.max_stop_strings} strings, got {len(stop)}"
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= limits.max_stop_chars:
            return f"stop[{i}] must be 1..{limits.max_stop_chars} characters, got {len(s)}"
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        return f"seed must be 0..2**63-1, got {seed}"
    return None


def validate(
    sampling: common_pb2.SamplingParams, max_tokens: int, prompt: str, limits: ModelLimits
) -> str | None:
    """What is wrong with a request for ``limits.model``, naming the field; None when
    it fits. Never echoes the prompt."""
    if not prompt:
        return "prompt must not be empty"
    if len(prompt) > limits.max_prompt_chars:
        return (
            f"prompt must be at most {limits.max_prompt_chars} characters for model "
            f"{limits.model[:MAX_NAME_CHARS]!r} (max_prompt_chars), got {len(prompt)}"
        )
    if not 1 <= max_tokens <= limits.max_tokens:
        return (
            f"max_tokens must be 1..{limits.max_tokens} for model "
            f"{limits.model[:MAX_NAME_CHARS]!r}, got {max_tokens}"
        )
    s = sampling
    return check_sampling(
        limits,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else -1,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        stop=s.stop,
        seed=s.seed if s.HasField("seed") else None,
    )
