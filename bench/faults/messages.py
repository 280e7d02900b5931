"""Hypothesis strategies for the bytes a fuzzed RPC receives, built from its request type.

One case is the raw request body (what a client could put on the wire):

- ``raw``: random bytes (mostly not protobuf at all);
- ``mutated``: a valid message with bytes flipped, inserted, cut or repeated;
- ``extreme``: a valid message whose fields take boundary values: integers at
  their type's limits, NaN, infinities, -0.0 and denormals, empty, NUL, RTL
  and astral-plane strings, giant strings and giant repeated fields (past
  every limit, each a single draw so hypothesis' buffer holds them), enum
  numbers no enum defines;
- ``unknown``: an ``extreme`` message followed by fields no version defines.

``hints`` steer string fields by name towards values that reach deeper code
(a served model, a known predictor target): a random model name only ever
meets ``NOT_FOUND``. ``max_tokens`` stays small unless it is far out of range,
so a fuzzed Execute or Generate never starts a long generation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import strategies as st

# Past every limit in the stack (prompt bytes, characters, message size).
GIANT_SIZES = (70_000, 300_000, 1_200_000)
GIANT_COUNTS = (300, 5_000, 50_000)
MAX_DEPTH = 3

_I32 = (-(2**31), 2**31 - 1)
_I64 = (-(2**63), 2**63 - 1)
_U32 = (0, 2**32 - 1)
_U64 = (0, 2**64 - 1)
_INTS: dict[int, tuple[int, int]] = {
    d.FieldDescriptor.TYPE_INT32: _I32,
    d.FieldDescriptor.TYPE_SINT32: _I32,
    d.FieldDescriptor.TYPE_SFIXED32: _I32,
    d.FieldDescriptor.TYPE_INT64: _I64,
    d.FieldDescriptor.TYPE_SINT64: _I64,
    d.FieldDescriptor.TYPE_SFIXED64: _I64,
    d.FieldDescriptor.TYPE_UINT32: _U32,
    d.FieldDescriptor.TYPE_FIXED32: _U32,
    d.FieldDescriptor.TYPE_UINT64: _U64,
    d.FieldDescriptor.TYPE_FIXED64: _U64,
}
_ODD_TEXT = ("", " ", "\x00", "\u202e", "\U0001f600" * 3, "e\u0301", "\n\t", "-1", "NaN")
_SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, 5e-324, 3.4e38, 1e308, -1e308)

Hints = Mapping[str, Sequence[str]]


def _integers(field: d.FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INTS[field.type]
    if field.name == "max_tokens":  # small, or far out of range: never a long generation
        return st.one_of(st.integers(0, 8), st.sampled_from([high, 10**6, 2**31 - 1]))
    edges = sorted({low, low + 1, -1 if low < 0 else 0, 0, 1, high - 1, high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _floats(field: d.FieldDescriptor) -> st.SearchStrategy[float]:
    if field.type == d.FieldDescriptor.TYPE_FLOAT:
        specials = [x for x in _SPECIAL_FLOATS if abs(x) < 3.5e38 or math.isnan(x)]
        return st.one_of(st.sampled_from(specials), st.floats(width=32))
    return st.one_of(st.sampled_from(_SPECIAL_FLOATS), st.floats())


def _strings(field: d.FieldDescriptor, hints: Hints, small: bool) -> st.SearchStrategy[str]:
    options: list[st.SearchStrategy[str]] = [st.text(max_size=24), st.sampled_from(_ODD_TEXT)]
    if not small:
        giant = st.tuples(st.sampled_from("a\u00e9\u4e2d"), st.sampled_from(GIANT_SIZES))
        options.append(giant.map(lambda t: t[0] * t[1]))
    hinted = hints.get(field.name)
    if hinted:
        options.insert(0, st.sampled_from(list(hinted)))
    return st.one_of(*options)


def _scalar(
    field: d.FieldDescriptor, hints: Hints, depth: int, small: bool
) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INTS:
        return _integers(field)
    if t in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
        return _floats(field)
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == d.FieldDescriptor.TYPE_STRING:
        return _strings(field, hints, small)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == d.FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        defined = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(defined), st.integers(*_I32))
    assert field.message_type is not None
    return messages(field.message_type, hints, depth + 1, small=small)


def _field(
    field: d.FieldDescriptor, hints: Hints, depth: int, small: bool
) -> st.SearchStrategy[Any]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(
            _scalar(key, hints, depth, True), _scalar(value, hints, depth, True), max_size=4
        )
    element = _scalar(field, hints, depth, small)
    if not field.is_repeated:
        return element
    if small:
        return st.lists(element, max_size=4)
    # One small element many times: giant in count, never giant times giant in bytes.
    one = _scalar(field, hints, depth, True)
    giant = st.tuples(one, st.sampled_from(GIANT_COUNTS)).map(lambda t: [t[0]] * t[1])
    return st.one_of(st.lists(element, max_size=4), giant)


def _build(descriptor: Any) -> Callable[[dict[str, Any]], Message]:
    cls = message_factory.GetMessageClass(descriptor)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                target = getattr(message, name)
                if isinstance(value, dict):
                    for k, v in value.items():
                        target[k] = v
                elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build


def messages(
    descriptor: Any, hints: Hints, depth: int = 0, *, small: bool = False
) -> st.SearchStrategy[Any]:
    """Valid messages of ``descriptor`` with boundary values; each field set or left unset.

    ``small``: no giant strings or lists (the element of a giant list)."""
    if depth > MAX_DEPTH:
        return st.just(message_factory.GetMessageClass(descriptor)())
    fields = {
        f.name: st.one_of(st.none(), _field(f, hints, depth, small)) for f in descriptor.fields
    }
    return st.fixed_dictionaries(fields).map(
        lambda values: _build(descriptor)({k: v for k, v in values.items() if v is not None})
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _unknown_fields() -> st.SearchStrategy[bytes]:
    """Fields numbered beyond any proto here, of every wire type."""
    number = st.integers(1000, 2**29 - 1)
    varint = st.tuples(number, st.integers(0, 2**64 - 1)).map(
        lambda t: _varint(t[0] << 3) + _varint(t[1])
    )
    fixed64 = st.tuples(number, st.binary(min_size=8, max_size=8)).map(
        lambda t: _varint((t[0] << 3) | 1) + t[1]
    )
    blob = st.tuples(number, st.binary(max_size=32)).map(
        lambda t: _varint((t[0] << 3) | 2) + _varint(len(t[1])) + t[1]
    )
    return st.lists(st.one_of(varint, fixed64, blob), min_size=1, max_size=4).map(b"".join)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Applies (kind, position, value) edits: flip, insert, cut, repeat a byte."""
    buf = bytearray(data)
    for kind, position, value in edits:
        i = position % (len(buf) + 1)
        if kind == 0 and buf:
            buf[i % len(buf)] ^= value or 0xFF
        elif kind == 1:
            buf.insert(i, value)
        elif kind == 2:
            del buf[i:]
        elif buf:
            buf[i:i] = buf[i % len(buf) : i % len(buf) + 1 + value % 8]
    return bytes(buf)


# A template's ids are made unique per case: the same id with another request
# is ALREADY_EXISTS, and would keep every case from going further.
UNIQUE_IDS = ("request_id", "job_id")
_ids = itertools.count()


def _edges(template: Message) -> st.SearchStrategy[Message]:
    """``template`` (a request the service serves) with one or two fields at boundary values."""
    descriptor: Any = template.DESCRIPTOR
    cls = message_factory.GetMessageClass(descriptor)
    names = [f.name for f in descriptor.fields]

    def combine(t: tuple[Message, list[str]]) -> Message:
        extreme, chosen = t
        message = cls()
        message.CopyFrom(template)
        for name in UNIQUE_IDS:
            if name in descriptor.fields_by_name:
                setattr(message, name, f"fuzz-{next(_ids)}")
        for name in chosen:
            part = cls()
            part.CopyFrom(extreme)
            for other in names:
                if other != name:
                    part.ClearField(other)
            message.ClearField(name)
            message.MergeFrom(part)
        return message

    chosen = st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)
    return st.tuples(messages(descriptor, {}), chosen).map(combine)


def request_cases(
    descriptor: d.Descriptor, hints: Hints, template: Message | None = None
) -> dict[str, st.SearchStrategy[bytes]]:
    """Strategies by kind for requests of type ``descriptor``: raw, mutated, extreme,
    unknown, and with a ``template`` (a request that succeeds) ``edge``: the template
    with one or two fields at boundary values, which reaches past the first check."""
    valid = messages(descriptor, hints).map(lambda m: m.SerializeToString())
    edit = st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255))
    kinds = {
        "raw": st.binary(max_size=512),
        "mutated": st.tuples(valid, st.lists(edit, min_size=1, max_size=4)).map(
            lambda t: _mutate(t[0], t[1])
        ),
        "extreme": valid,
        "unknown": st.tuples(valid, _unknown_fields()).map(lambda t: t[0] + t[1]),
    }
    if template is not None and descriptor.fields:
        kinds["edge"] = _edges(template).map(lambda m: m.SerializeToString())
    return kinds
