"""Durable record of what really happened to every finished request: schema,
writer (the scheduler) and reader (the predictor's trainer), in one place.

The predictor is retrained from it (``shortline predictor train --from-log``),
so the operator's own traffic teaches the length model. SQLite in WAL mode:
one writer, readers never block it. Rows are buffered and committed in
batches, so a request costs a list append, not an fsync.

The log holds other people's prompts, so it is private and bounded:

- the file and its ``-wal``/``-shm`` companions are mode 0600 (SQLite gives the
  companions the database file's mode; an existing file readable by others is
  tightened, with a warning);
- retention: the newest ``max_rows`` rows, none older than ``max_age_s``, applied
  when the log opens and then at most every ``retention_every_s`` at a flush
  (two DELETEs off the event loop, not work per row);
- prompt mode ``digest`` stores the prompt's SHA-256 and the predictor's
  embedding (float32, little-endian) instead of its text. The heads can still be
  refitted on those embeddings; a row written without an embedding (no
  predictor, or the predictor failed) keeps only the digest and trains nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROMPT_MODES = ("text", "digest")
FILE_MODE = 0o600
DEFAULT_RETENTION_EVERY_S = 60.0

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
  prediction_source TEXT,
  prompt_sha256 TEXT,
  prompt_chars INTEGER,
  embedding BLOB
)
"""

# Columns added after the first schema, in order: an older file gets them (NULL
# in its old rows) when a writer opens it, and readers select NULL when absent.
ADDED_COLUMNS = (
    ("prompt_sha256", "TEXT"),
    ("prompt_chars", "INTEGER"),
    ("embedding", "BLOB"),
)

_INSERT = (
    "INSERT INTO outcomes(ts, request_id, model, length_model, prompt, predicted_tokens,"
    " actual_tokens, queue_wait_s, ttft_s, completion_s, preemptions, finish_reason,"
    " prediction_source, prompt_sha256, prompt_chars, embedding)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
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
    # The predictor's 384-d unit embedding of the prompt, when the request got one.
    # Kept only in digest mode (in text mode the text can be encoded again).
    embedding: Sequence[float] | None = None


class OutcomeLogError(ValueError):
    """The outcome log settings are unusable; the message names the flag."""


def prompt_digest(prompt: str) -> str:
    """Hex SHA-256 of the prompt's UTF-8: equal prompts match without their text."""
    return hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


def embedding_blob(embedding: Sequence[float] | None) -> bytes | None:
    if embedding is None or len(embedding) == 0:
        return None
    return np.asarray(embedding, dtype="<f4").tobytes()


def embedding_of(blob: bytes | None) -> np.ndarray | None:
    """The stored embedding as float32, or None."""
    if not blob:
        return None
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _tighten(path: Path) -> None:
    """Makes an existing file 0600, saying so when others could read or write it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        log.warning(
            "file %s had mode %o (others could read it); setting %o",
            path,
            mode,
            FILE_MODE,
        )
        path.chmod(FILE_MODE)


def private_file(path: Path) -> None:
    """Creates ``path`` as an empty 0600 file, or tightens an existing one.

    Created before SQLite opens it, so no moment exists where the file (and the
    ``-wal``/``-shm`` files SQLite then creates with the same mode) is readable
    by others; the process umask cannot widen it. Shared with the scheduler's
    journal, which holds prompts too.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    except FileExistsError:
        for file in (path, *_companions(path)):
            _tighten(file)
    else:
        os.close(fd)


def _companions(path: Path) -> tuple[Path, Path]:
    return Path(f"{path}-wal"), Path(f"{path}-shm")


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [str(r[1]) for r in conn.execute("PRAGMA table_info(outcomes)")]


class OutcomeLog:
    """Thread-safe; ``append`` is cheap, ``flush`` commits (call it off the event loop).

    ``prompts``: ``text`` or ``digest``; ``max_rows`` and ``max_age_s``: retention
    (0 keeps everything).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        prompts: str = "text",
        max_rows: int = 0,
        max_age_s: float = 0.0,
        batch_rows: int = 64,
        max_delay_s: float = 1.0,
        retention_every_s: float = DEFAULT_RETENTION_EVERY_S,
    ) -> None:
        if prompts not in PROMPT_MODES:
            raise OutcomeLogError(
                f"outcome log prompt mode must be one of {', '.join(PROMPT_MODES)} "
                f"(--outcome-log-prompts), got {prompts!r}"
            )
        if max_rows < 0 or not max_age_s >= 0:
            raise OutcomeLogError(
                "outcome log retention must be >= 0 (--outcome-log-max-rows, "
                f"--outcome-log-max-age-days), got {max_rows} rows and {max_age_s} s"
            )
        self.path = Path(path)
        self.prompts = prompts
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.retention_every_s = retention_every_s
        private_file(self.path)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(SCHEMA)
        self._migrate()
        self._conn.commit()
        for file in _companions(self.path):  # made by SQLite with the file's mode
            _tighten(file)
        self._lock = threading.Lock()  # the pending rows
        self._db = threading.Lock()  # the connection: a slow commit never blocks append
        self._pending: list[Outcome] = []
        self._batch_rows = batch_rows
        self._max_delay_s = max_delay_s
        self._oldest: float | None = None
        self.written = 0
        self.pruned = 0
        self._next_retention = 0.0
        with self._db:
            self._retain()

    @property
    def wants_embeddings(self) -> bool:
        """Whether rows keep the predictor's embedding (the scheduler then asks for it)."""
        return self.prompts == "digest"

    def _migrate(self) -> None:
        have = set(_columns(self._conn))
        for name, kind in ADDED_COLUMNS:
            if name not in have:
                self._conn.execute(f"ALTER TABLE outcomes ADD COLUMN {name} {kind}")
                log.info("outcome log %s: added column %s", self.path, name)

    def append(self, outcome: Outcome) -> bool:
        """Buffers a row; returns True when a flush is due (batch full or too old)."""
        with self._lock:
            self._pending.append(outcome)
            now = time.monotonic()
            if self._oldest is None:
                self._oldest = now
            return len(self._pending) >= self._batch_rows or now - self._oldest >= self._max_delay_s

    def _row(self, o: Outcome) -> tuple[object, ...]:
        digest = self.prompts == "digest"
        return (
            o.ts,
            o.request_id,
            o.model,
            o.length_model,
            None if digest else o.prompt,
            o.predicted_tokens,
            o.actual_tokens,
            o.queue_wait_s,
            o.ttft_s,
            o.completion_s,
            o.preemptions,
            o.finish_reason,
            o.prediction_source,
            prompt_digest(o.prompt),
            len(o.prompt),
            embedding_blob(o.embedding) if digest else None,
        )

    def flush(self) -> int:
        """Commits the buffered rows (and, when due, applies retention); returns how many."""
        # The connection first, then the buffer: rows reach the file in append order
        # even when two flushes overlap, and append waits only for the swap.
        with self._db:
            with self._lock:
                pending, self._pending = self._pending, []
                self._oldest = None
            rows = [self._row(o) for o in pending]
            if rows:
                self._conn.executemany(_INSERT, rows)
                self._conn.commit()
                self.written += len(rows)
            if time.monotonic() >= self._next_retention:
                self._retain()
        return len(rows)

    def recent_keys(self, rows: int) -> set[tuple[str, float]]:
        """(request_id, ts) of the newest ``rows`` rows: how a restarted writer tells the
        rows it is unsure were written from those that were (ids only grow)."""
        with self._db:
            found = self._conn.execute(
                "SELECT request_id, ts FROM outcomes"
                " WHERE id > (SELECT coalesce(max(id), 0) FROM outcomes) - ?",
                (rows,),
            ).fetchall()
        return {(str(rid), float(ts)) for rid, ts in found}

    def prune(self, now: float | None = None) -> int:
        """Applies retention now; returns the rows deleted."""
        with self._db:
            return self._retain(now)

    def _retain(self, now: float | None = None) -> int:
        self._next_retention = time.monotonic() + self.retention_every_s
        deleted = 0
        # Rows are appended in time order and only ever deleted from the oldest end, so
        # both limits cut a prefix of ids: each DELETE walks the rows it removes plus one,
        # never the whole table (a full scan of 200,000 rows took 0.1-0.26 s).
        if self.max_age_s > 0:
            cutoff = (time.time() if now is None else now) - self.max_age_s
            deleted += self._conn.execute(
                "DELETE FROM outcomes WHERE id < coalesce("
                "(SELECT id FROM outcomes WHERE ts >= ? ORDER BY id LIMIT 1),"
                " (SELECT max(id) + 1 FROM outcomes))",
                (cutoff,),
            ).rowcount
        if self.max_rows > 0:
            deleted += self._conn.execute(
                "DELETE FROM outcomes WHERE id <= (SELECT max(id) FROM outcomes) - ?",
                (self.max_rows,),
            ).rowcount
        # Always: a DELETE that removed nothing still opened a write transaction, and
        # left open it would lock every other writer of the file out.
        self._conn.commit()
        if deleted:
            self.pruned += deleted
            log.debug("outcome log %s: retention deleted %d rows", self.path, deleted)
        return deleted

    def close(self) -> None:
        self.flush()
        with self._db:
            self._conn.close()

    def __enter__(self) -> OutcomeLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FINISHED_REASONS = ("stop", "length")


@dataclass(frozen=True)
class LoggedRow:
    """One finished row as the trainer reads it: text, or digest and embedding."""

    prompt: str | None
    prompt_sha256: str | None
    prompt_chars: int | None
    embedding: np.ndarray | None
    actual_tokens: int


def read_rows(path: Path | str, length_model: str) -> list[LoggedRow]:
    """The finished rows for ``length_model``, oldest first.

    Only ``stop`` and ``length`` rows carry a real length: a cancelled or
    failed request says nothing about how long the answer would have been.
    Opens the file read-only, so a running scheduler keeps writing; a file
    from before the digest columns reads with them NULL.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"outcome log {path} does not exist")
    marks = ",".join("?" * len(FINISHED_REASONS))
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            have = set(_columns(conn))
            if not have:
                raise ValueError(f"{path} has no outcomes table: is it a Shortline outcome log?")
            picked = ", ".join(
                c if c in have else f"NULL AS {c}"
                for c in ("prompt", "prompt_sha256", "prompt_chars", "embedding")
            )
            rows = conn.execute(
                f"SELECT {picked}, actual_tokens FROM outcomes WHERE length_model = ? "
                f"AND finish_reason IN ({marks}) AND actual_tokens IS NOT NULL ORDER BY id",
                (length_model, *FINISHED_REASONS),
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path} is not a readable SQLite outcome log: {exc}") from exc
    return [
        LoggedRow(
            prompt=None if prompt is None else str(prompt),
            prompt_sha256=None if sha is None else str(sha),
            prompt_chars=None if chars is None else int(chars),
            embedding=embedding_of(blob),
            actual_tokens=max(int(tokens), 0),
        )
        for prompt, sha, chars, blob, tokens in rows
    ]


def read_lengths(path: Path | str, length_model: str) -> list[tuple[str, int]]:
    """(prompt, actual tokens) of the finished rows that kept their text, oldest first."""
    return [
        (r.prompt, r.actual_tokens) for r in read_rows(path, length_model) if r.prompt is not None
    ]
