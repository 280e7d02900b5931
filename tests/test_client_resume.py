"""A retried stream delivers every character exactly once, and never splices two
generations: a replay that differs from the text delivered raises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shortline.client import ClientConfigError, ClientError, ClientOptions, StreamDivergedError
from shortline.client.resume import DeliveredText, StreamState
from shortline.client.types import build_request
from shortline.scheduler.v1 import scheduler_pb2


def test_replayed_prefix_is_not_delivered_twice() -> None:
    text = DeliveredText()
    assert text.accept("Hello") == "Hello"
    assert text.accept(", wor") == ", wor"
    text.new_attempt()  # the scheduler replays everything so far, in other chunks
    assert text.accept("Hel") == ""
    assert text.accept("lo, w") == ""
    assert text.accept("orld!") == "ld!"
    assert text.text == "Hello, world!"


@given(
    full=st.text(min_size=1, max_size=60),
    cut=st.integers(min_value=0, max_value=60),
    chunks=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20),
)
def test_any_chunking_of_a_replay_reconstructs_the_text(
    full: str, cut: int, chunks: list[int]
) -> None:
    delivered = DeliveredText()
    first = full[: min(cut, len(full))]
    out = [delivered.accept(first)]
    delivered.new_attempt()
    pos = 0
    i = 0
    while pos < len(full):
        size = chunks[i % len(chunks)]
        out.append(delivered.accept(full[pos : pos + size]))
        pos += size
        i += 1
    assert "".join(out) == full
    assert delivered.text == full


def test_a_replay_that_differs_raises_instead_of_splicing() -> None:
    text = DeliveredText()
    assert text.accept("The river") == "The river"
    text.new_attempt()  # the scheduler started another generation over
    assert text.accept("The ") == ""
    with pytest.raises(StreamDivergedError) as err:
        text.accept("lake is")  # same length as what follows "The ", other characters
    assert err.value.offset == 4
    assert text.text == "The river"  # nothing of the other generation was delivered


def test_a_divergence_inside_one_chunk_that_also_carries_new_text_raises() -> None:
    text = DeliveredText()
    text.accept("abc")
    text.new_attempt()
    with pytest.raises(StreamDivergedError) as err:
        text.accept("abXdef")  # the count alone would deliver "def"
    assert err.value.offset == 2
    assert text.text == "abc"


def test_a_replay_that_ends_before_the_delivered_text_raises() -> None:
    state = StreamState(scheduler_pb2.GenerateRequest(request_id="r1"), None)
    state.delivered.new_attempt()
    state.handle(delta("Hello, world"))
    state.delivered.new_attempt()
    state.handle(delta("Hello"))
    with pytest.raises(StreamDivergedError, match=r"'r1'.*character 5"):
        state.handle(scheduler_pb2.GenerateResponse(result=scheduler_pb2.GenerateResult()))
    assert state.result is None


def test_stream_state_names_the_request_and_the_error_is_a_client_error() -> None:
    state = StreamState(scheduler_pb2.GenerateRequest(request_id="rid-7"), None)
    state.delivered.new_attempt()
    assert state.handle(delta("one two")) == "one two"
    state.delivered.new_attempt()
    with pytest.raises(ClientError) as err:
        state.handle(delta("one too"))
    assert isinstance(err.value, StreamDivergedError)
    assert err.value.request_id == "rid-7" and err.value.offset == 5
    assert "rid-7" in str(err.value) and "character 5" in str(err.value)


def test_the_first_attempt_is_never_compared_and_an_identical_replay_continues() -> None:
    state = StreamState(scheduler_pb2.GenerateRequest(request_id="r"), None)
    state.delivered.new_attempt()
    assert state.handle(delta("same")) == "same"
    state.delivered.new_attempt()
    assert state.handle(delta("sa")) == ""
    assert state.handle(delta("me and more")) == " and more"
    state.handle(scheduler_pb2.GenerateResponse(result=scheduler_pb2.GenerateResult()))
    assert state.result is not None and state.delivered.text == "same and more"


@given(
    full=st.text(min_size=2, max_size=60),
    cut=st.integers(min_value=1, max_value=60),
    where=st.integers(min_value=0, max_value=59),
)
def test_any_changed_character_in_a_replayed_prefix_is_caught(
    full: str, cut: int, where: int
) -> None:
    cut = min(cut, len(full))
    where %= cut
    delivered = DeliveredText()
    delivered.accept(full[:cut])
    delivered.new_attempt()
    other = chr((ord(full[where]) + 1) % 0x10FFFF or 1)
    replay = full[:where] + other + full[where + 1 :]
    with pytest.raises(StreamDivergedError) as err:
        delivered.accept(replay)
    assert err.value.offset == where
    assert delivered.text == full[:cut]


def test_client_options_refuse_a_negative_reattach_grace() -> None:
    with pytest.raises(ClientConfigError, match="reattach_grace_seconds"):
        ClientOptions(reattach_grace_seconds=-1.0)
    request = build_request(
        "hi",
        request_id="x",
        model="m",
        max_tokens=1,
        temperature=None,
        top_p=None,
        ignore_eos=False,
        priority=None,
        length_model="",
        reattach_grace_seconds=ClientOptions(reattach_grace_seconds=12.5).reattach_grace_seconds,
    )
    assert request.reattach_grace_seconds == 12.5
    unset = build_request(
        "hi",
        request_id="x",
        model="m",
        max_tokens=1,
        temperature=None,
        top_p=None,
        ignore_eos=False,
        priority=None,
        length_model="",
    )
    assert not unset.HasField("reattach_grace_seconds")  # the default: cancelled at once


def delta(text: str) -> scheduler_pb2.GenerateResponse:
    return scheduler_pb2.GenerateResponse(delta=scheduler_pb2.TextDelta(text=text, tokens=1))
