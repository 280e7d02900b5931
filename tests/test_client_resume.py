"""A retried stream delivers every character exactly once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shortline.client.resume import DeliveredText


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
