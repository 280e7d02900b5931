"""The prediction used when the predictor fails or is late.

The running median of recently observed lengths for the target model: robust
to the long tail, and it adapts to the traffic. Before any observation, a
configured default. At most ``max_models`` windows are kept (the least recently
observed goes first): target model names come from clients, so the memory they
take must not grow with them.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque

MAX_MODELS = 64


class _Window:
    def __init__(self, size: int) -> None:
        self.order: deque[int] = deque()
        self.sorted: list[int] = []
        self.size = size

    def add(self, value: int) -> None:
        self.order.append(value)
        bisect.insort(self.sorted, value)
        if len(self.order) > self.size:
            old = self.order.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]

    def median(self) -> float:
        s = self.sorted
        n = len(s)
        mid = n // 2
        return float(s[mid]) if n % 2 else (s[mid - 1] + s[mid]) / 2.0


class FallbackPredictor:
    def __init__(
        self, default_tokens: float = 256.0, window: int = 1001, max_models: int = MAX_MODELS
    ) -> None:
        if window < 1:
            raise ValueError(f"fallback window must be >= 1, got {window}")
        if max_models < 1:
            raise ValueError(f"fallback max_models must be >= 1, got {max_models}")
        self.default_tokens = default_tokens
        self._window = window
        self._max_models = max_models
        self._models: OrderedDict[str, _Window] = OrderedDict()
        self.used = 0

    def observe(self, model: str, tokens: int) -> None:
        w = self._models.get(model)
        if w is None:
            w = self._models[model] = _Window(self._window)
            if len(self._models) > self._max_models:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model)
        w.add(tokens)

    def predict(self, model: str) -> float:
        """Counts a use: every call stands for one request served without a real prediction."""
        self.used += 1
        w = self._models.get(model)
        return w.median() if w is not None and w.sorted else self.default_tokens
