"""Head+tail truncation of a prompt's token ids, shared by every extractor.

A long prompt usually puts the task at the start and the question or the
constraint ("answer in one word") at the end, so an over-long prompt keeps
its head and its tail and loses its middle (which says least).
"""

from __future__ import annotations

from collections.abc import Sequence


def head_and_tail(ids: Sequence[int], budget: int) -> list[int]:
    """``ids`` if they fit in ``budget``, else their first and last tokens, ``budget`` in all.

    The head gets the larger half of an odd budget.
    """
    body = list(ids)
    if len(body) <= budget:
        return body
    head = (budget + 1) // 2
    tail = budget - head
    return body[:head] + body[len(body) - tail :]
