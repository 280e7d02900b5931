"""A test sink for an engine sequence's emissions, shared by the worker tests."""

from __future__ import annotations

import threading

from services.worker.triton.engine import Emission


class Collector:
    def __init__(self) -> None:
        self.emissions: list[Emission] = []
        self.done = threading.Event()

    def __call__(self, e: Emission) -> None:
        self.emissions.append(e)
        if e.finish_reason or e.error:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.emissions)
