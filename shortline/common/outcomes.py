"""Durable record of what really happened to every finished request: schema,
writer (the scheduler) and reader (the predictor's trainer), in one place.

The predictor is retrained from it (``shortline predictor train --from-log``),
so the operator's own traffic teaches the length model. SQLite in WAL mode:
one writer, readers never block it. Rows are buffered and committed in
batches, so a request costs a list append, not an fsync.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes(
  id INTEGER PRIMARY KEY,
  ts REAL,
  request_id TEXT,
  model TEXT,
  length_model TEXT,
  prompt TEXT,
  predicted_tokens REAL,
  actual_tokens INTEGER,
  queue_wait_s REAL,
  ttft_s REAL,
  completion_s REAL,
  preemptions INTEGER,
  finish_reason TEXT,
  prediction_source TEXT
)
"""

_INSERT = (
    "INSERT INTO outcomes(ts, request_id, model, length_model, prompt, predicted_tokens,"
    " actual_tokens, queue_wait_s, ttft_s, completion_s, preemptions, finish_reason,"
    " prediction_source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


@dataclass(frozen=True)
class Outcome:
    ts: float  # unix time of completion
    request_id: str
    model: str
    length_model: str
    prompt: str
    predicted_tokens: float
    actual_tokens: int
    queue_wait_s: float
    ttft_s: float
    completion_s: float
    preemptions: int
    finish_reason: str  # stop, length, cancelled, deadline, error
    prediction_source: str  # predictor, cache, fallback, oracle


class OutcomeLog:
    """Thread-safe; ``append`` is cheap, ``flush`` commits (call it off the event loop)."""

    def __init__(self, path: Path | str, *, batch_rows: int = 64, max_delay_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(SCHEMA)
        self._conn.commit()
        self._lock = threading.Lock()
        self._pending: list[tuple[object, ...]] = []
        self._batch_rows = batch_rows
        self._max_delay_s = max_delay_s
        self._oldest: float | None = None
        self.written = 0

    def append(self, outcome: Outcome) -> bool:
        """Buffers a row; returns True when a flush is due (batch full or too old)."""
        with self._lock:
            self._pending.append(astuple(outcome))
            now = time.monotonic()
            if self._oldest is None:
                self._oldest = now
            return len(self._pending) >= self._batch_rows or now - self._oldest >= self._max_delay_s

    def flush(self) -> int:
        with self._lock:
            rows, self._pending = self._pending, []
            self._oldest = None
            if rows:
                self._conn.executemany(_INSERT, rows)
                self._conn.commit()
                self.written += len(rows)
            return len(rows)

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()

    def __enter__(self) -> OutcomeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FINISHED_REASONS = ("stop", "length")


def read_lengths(path: Path | str, length_model: str) -> list[tuple[str, int]]:
    """(prompt, actual tokens) of the finished rows for ``length_model``, oldest first.

    Only ``stop`` and ``length`` rows carry a real length: a cancelled or
    failed request says nothing about how long the answer would have been.
    Opens the file read-only, so a running scheduler keeps writing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"outcome log {path} does not exist")
    marks = ",".join("?" * len(FINISHED_REASONS))
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            f"SELECT prompt, actual_tokens FROM outcomes WHERE length_model = ? "
            f"AND finish_reason IN ({marks}) AND actual_tokens IS NOT NULL ORDER BY id",
            (length_model, *FINISHED_REASONS),
        ).fetchall()
    return [(str(prompt), max(int(tokens), 0)) for prompt, tokens in rows]
