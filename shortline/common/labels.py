"""Metric label values from a known set only.

A Prometheus label value taken from a request (a model name, a length model)
would let any client create series without bound: each service maps such a
value to itself only when it names something the service knows (a served
model, a predictor head), and to ``other`` otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

OTHER = "other"


def bounded(value: str, known: Collection[str]) -> str:
    """``value`` when it is in ``known``, else ``"other"``."""
    return value if value in known else OTHER


class KnownNames:
    """A growing set of names that may become label values, capped at ``limit``.

    Names stay known once added (a series already exported keeps its label when
    the worker serving it leaves); past ``limit`` new names map to ``other``, so
    even a misbehaving source of names cannot grow the series without bound."""

    def __init__(self, names: Iterable[str] = (), limit: int = 64) -> None:
        self.limit = limit
        self._names: set[str] = set()
        self.add(names)

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            if len(self._names) >= self.limit:
                return
            self._names.add(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def label(self, value: str) -> str:
        """``value`` when known, else ``"other"``."""
        return bounded(value, self._names)
