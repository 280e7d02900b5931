"""Shared fixtures.

``embedded_triton``: one real Triton server per test session (both embedded
models: ``smollm2-135m-instruct`` and ``replay``), started only when a test
asks for it (about 30 s on two cores, most of it loading SmolLM2) and stopped
at the end of the session with its stubs and shared memory.

Every test gets a journal folder of its own (``SHORTLINE_JOURNAL_DIR``, inherited
by the processes it starts): a scheduler reloads the unfinished requests of the
journal for its port, and a later test must not inherit an earlier one's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# Fast replay steps keep tests short: 10 ms + 1 ms per sequence in the batch.
REPLAY_STEP_A_MS = 10.0
REPLAY_STEP_B_MS = 1.0


@pytest.fixture(autouse=True)
def journal_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Any:
    folder = tmp_path_factory.mktemp("journal")
    monkeypatch.setenv("SHORTLINE_JOURNAL_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def embedded_triton() -> Iterator[Any]:
    from services.worker.config import TritonServeConfig
    from services.worker.triton.embedded import EmbeddedTriton

    triton = EmbeddedTriton(
        TritonServeConfig(replay_step_a_ms=REPLAY_STEP_A_MS, replay_step_b_ms=REPLAY_STEP_B_MS)
    )
    triton.start()
    try:
        yield triton
    finally:
        triton.stop()
