"""The admission journal's tables and how a row reads back (``journal.Journal.load``).

The writer is ``journal.py``; a row's times are wall-clock (``time.time()``), a
request's text is the concatenation of its ``deltas`` rows in insertion order.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import grpc

from shortline.common.outcomes import Outcome, embedding_of
from shortline.scheduler.v1 import scheduler_pb2

# 2: ``requests.messages`` (a chat request's conversation, JSON; NULL for a prompt).
SCHEMA_VERSION = 2
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS requests(
  key TEXT PRIMARY KEY,
  request_id TEXT NOT NULL,
  tenant TEXT NOT NULL,
  arrival REAL NOT NULL,
  deadline REAL,
  model TEXT NOT NULL,
  length_model TEXT NOT NULL,
  prompt TEXT,
  max_tokens INTEGER NOT NULL,
  sampling BLOB NOT NULL,
  fingerprint BLOB NOT NULL,
  reattach_grace REAL NOT NULL,
  predicted REAL,
  source TEXT,
  first_dispatch REAL,
  first_token REAL,
  preemptions INTEGER NOT NULL DEFAULT 0,
  requeues INTEGER NOT NULL DEFAULT 0,
  worker_id TEXT NOT NULL DEFAULT '',
  state INTEGER,
  finish_reason TEXT,
  finished REAL,
  final BLOB,
  final_code INTEGER,
  final_message TEXT,
  outcome TEXT,
  embedding BLOB,
  messages TEXT
)""",
    "CREATE TABLE IF NOT EXISTS deltas(key TEXT NOT NULL, text TEXT NOT NULL, tokens INTEGER)",
    "CREATE INDEX IF NOT EXISTS deltas_key ON deltas(key)",
)
# What brings a journal of an older schema version to this one, by its version: an
# older scheduler's file is read by a newer one (an upgrade restarts the scheduler),
# never the other way round (an older scheduler refuses a newer file by its version).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE requests ADD COLUMN messages TEXT",),
}
# A request's priority band, for the requests not in band 0 (absent: 0). A table of its
# own, made at every open, rather than a column: no schema version, so a journal moves
# between schedulers with and without bands in both directions (an older one ignores
# the table), and band-0 requests cost nothing. A trigger forgets a band with its request.
BANDS = (
    "CREATE TABLE IF NOT EXISTS bands(key TEXT PRIMARY KEY, priority INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS bands_forget AFTER DELETE ON requests"
    " BEGIN DELETE FROM bands WHERE key = OLD.key; END",
)


def write_band(conn: sqlite3.Connection, key: str, priority: int) -> None:
    """Journals a newly admitted request's band (the writer calls it with the request's
    INSERT; nothing is written for band 0)."""
    if priority:
        conn.execute("INSERT OR REPLACE INTO bands(key, priority) VALUES (?,?)", (key, priority))
    else:
        conn.execute("DELETE FROM bands WHERE key=?", (key,))


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Brings the file from ``version`` (0: new) to SCHEMA_VERSION in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in SCHEMA:
                conn.execute(statement)
        else:
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
        for statement in BANDS:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class Record:
    """One request as the journal holds it; times are wall-clock (``time.time()``)."""

    key: str
    request_id: str
    tenant: str
    arrival: float
    deadline: float | None
    model: str
    length_model: str
    prompt: str
    max_tokens: int
    sampling: bytes
    fingerprint: tuple[bytes, ...]
    reattach_grace: float
    predicted: float | None
    source: str
    first_dispatch: float | None
    first_token: float | None
    preemptions: int
    requeues: int
    worker_id: str
    text: str = ""
    tokens: int = 0
    state: int | None = None
    finish_reason: str = ""
    finished: float | None = None
    final: Any = None  # GenerateResponse, (StatusCode, message), or None while live
    outcome: Outcome | None = None  # not yet in the outcome log
    # A chat request's conversation as ``chat.to_json`` wrote it; None for a prompt.
    messages: str | None = None
    priority: int = 0  # its band, kept across a restart


@dataclass
class Loaded:
    live: list[Record] = field(default_factory=list)
    finished: list[Record] = field(default_factory=list)  # oldest first
    unlogged: list[Record] = field(default_factory=list)


def read(conn: sqlite3.Connection, cutoff: float) -> tuple[Loaded, list[str]]:
    """The journal's rows: live, finished since ``cutoff`` (wall-clock), not yet in the
    outcome log; and the keys of finished rows old enough to delete."""
    texts: dict[str, tuple[list[str], int]] = {}
    for key, text, tokens in conn.execute("SELECT key, text, tokens FROM deltas ORDER BY rowid"):
        parts, count = texts.get(key, ([], 0))
        parts.append(text)
        texts[key] = (parts, count + int(tokens or 0))
    bands = dict(conn.execute("SELECT key, priority FROM bands"))
    loaded = Loaded()
    stale = []
    for row in conn.execute("SELECT * FROM requests ORDER BY coalesce(finished, arrival), arrival"):
        record = _record(row, texts)
        record.priority = int(bands.get(record.key, 0))
        if record.outcome is not None:
            loaded.unlogged.append(record)
        if record.final is None:
            loaded.live.append(record)
        elif record.finished is not None and record.finished >= cutoff:
            loaded.finished.append(record)
        elif record.outcome is None:
            stale.append(record.key)
    return loaded, stale


def _record(row: tuple[Any, ...], texts: dict[str, tuple[list[str], int]]) -> Record:
    (
        key,
        request_id,
        tenant,
        arrival,
        deadline,
        model,
        length_model,
        prompt,
        max_tokens,
        sampling,
        fingerprint,
        grace,
        predicted,
        source,
        first_dispatch,
        first_token,
        preemptions,
        requeues,
        worker_id,
        state,
        finish_reason,
        finished,
        final_blob,
        final_code,
        final_message,
        outcome_json,
        embedding,
        messages,
    ) = row
    parts, tokens = texts.get(key, ([], 0))
    final: Any = None
    if final_blob is not None:
        final = scheduler_pb2.GenerateResponse.FromString(final_blob)
    elif final_code:
        final = (_CODES.get(int(final_code), grpc.StatusCode.UNAVAILABLE), str(final_message))
    outcome = None
    if outcome_json:
        fields = json.loads(outcome_json)
        outcome = Outcome(**fields, prompt=prompt or "", embedding=_vector(embedding))
    return Record(
        key=key,
        request_id=request_id,
        tenant=tenant,
        arrival=float(arrival),
        deadline=None if deadline is None else float(deadline),
        model=model,
        length_model=length_model,
        prompt=prompt or "",
        max_tokens=int(max_tokens),
        sampling=bytes(sampling),
        fingerprint=tuple(bytes(fingerprint[i : i + 32]) for i in range(0, len(fingerprint), 32)),
        reattach_grace=float(grace),
        predicted=None if predicted is None or math.isnan(predicted) else float(predicted),
        source=source or "",
        first_dispatch=first_dispatch,
        first_token=first_token,
        preemptions=int(preemptions),
        requeues=int(requeues),
        worker_id=worker_id or "",
        text="".join(parts),
        tokens=tokens,
        state=None if state is None else int(state),
        finish_reason=finish_reason or "",
        finished=finished,
        final=final,
        outcome=outcome,
        messages=messages,
    )


def _vector(blob: bytes | None) -> list[float] | None:
    vector = embedding_of(blob)
    return None if vector is None else [float(x) for x in vector]
