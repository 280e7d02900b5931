"""The admission journal: what a scheduler killed with -9 needs to carry on.

Every admitted request is written to a SQLite file (WAL) with what it was made
of (the prompt or a chat request's messages, the sampling, the fingerprint, its
arrival and deadline as wall-clock times), its prediction, the text delivered
so far and how it ended.
A restarted scheduler reloads it (``dataplane.SchedulerService.restore``):
queued and running jobs go back to the queue with their original arrivals and
the text already generated, so a client that reattaches with the same id gets
that text again and the rest, generated from the prompt plus that text; and a
recently finished request answers its retried id with the same result.

Write-ahead, not write-behind: a request's new text and its end reach its
client streams only after the commit that holds them (:meth:`Journal.changed`
marks the request, :meth:`Journal.commit` writes every marked request's news
in one transaction, then publishes it: ``streams.Request.publish``). So no
client ever holds text the journal lacks, and a restarted scheduler can never
continue a stream from a point before what its client already has (which
would splice two generations). Changes are batched: the first change
schedules one commit, and every change made before it runs (deltas of many
streams arriving together) joins it. The commit runs on the next event-loop
turn, or, within ``COMMIT_GAP_S`` of the previous commit, that long after it:
a transaction has a fixed cost, and under load one every few milliseconds
carries the deltas of every stream instead of one each (bench.relay: 5-7
client messages per commit), while an idle scheduler's first change is written
at once. Within one transaction, every stream's new text is one
``executemany`` and a request's other news one ``UPDATE`` of its row. What is
left costs per row more than per commit (a 10 ms gap put 23% more messages in
a commit and each commit took 21% longer; docs/scaling.md). The delay a change
waits is measured as ``shortline_journal_delay_seconds``.

Durability: ``synchronous=NORMAL`` in WAL mode writes each commit to the WAL
before returning, so a process that dies at any point (kill -9, the OOM
killer) loses nothing committed; a power cut may lose the last commits.
Checkpoints (which fsync) run on a thread of their own, off the event loop.

The file holds prompts of unfinished requests (and, until the outcome log has
its row, of requests that just finished), so it is private like the outcome
log (0600) and bounded: a finished request's rows are deleted when the result
store lets go of it (its TTL or the store's cap). One scheduler per journal:
a second one on the same file is refused (an exclusive lock), since two
schedulers reloading the same requests would run each twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.scheduler import metrics
from services.scheduler.service import chat
from services.scheduler.service.journal_rows import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Loaded,
    migrate,
    read,
    write_band,
)
from services.scheduler.service.streams import Request
from shortline.common.outcomes import Outcome, embedding_blob, private_file

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 1.0
RETRY_AFTER_S = 0.5  # after a failed commit (disk full, I/O error)
# Commits start at least this far apart (module docstring); far below what a user sees.
COMMIT_GAP_S = 0.005


class JournalError(RuntimeError):
    """The journal cannot be used (in use, unreadable); the message names the file."""


def _wall(mono: float | None, now_mono: float, now_wall: float) -> float | None:
    return None if mono is None else now_wall - (now_mono - mono)


def meta_of(req: Request) -> tuple[Any, ...]:
    """What of a request changes now and then (dispatch, counts): rewritten when it does."""
    job = req.job
    return (
        job.first_dispatch,
        job.first_token,
        job.preemptions,
        job.requeues,
        req.worker_id,
        req.reattach_grace_s,
    )


# The columns of the row's UPDATE, each group written when it changed.
PREDICTED_COLUMNS = ("predicted=?", "source=?")
META_COLUMNS = (
    "first_dispatch=?",
    "first_token=?",
    "preemptions=?",
    "requeues=?",
    "worker_id=?",
    "reattach_grace=?",
)
FINAL_COLUMNS = (
    "state=?",
    "finish_reason=?",
    "finished=?",
    "final=?",
    "final_code=?",
    "final_message=?",
    "outcome=?",
    "embedding=?",
    "prompt=?",
    "messages=NULL",  # a retried id needs the result, not the conversation
)


@dataclass
class Mark:
    """What of one request the journal already holds (compared at each commit)."""

    admitted: bool = False
    chars: int = 0
    tokens: int = 0
    predicted: bool = False
    meta: tuple[Any, ...] = ()
    final: bool = False
    outcome: Outcome | None = None  # to write with the final, until the outcome log has it


class Journal:
    """One scheduler's journal file; every method runs on the event loop's thread."""

    def __init__(self, path: Path | str, clock: Any) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock_file = self._take_lock()
        private_file(self.path)
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints: our thread
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, *MIGRATIONS, SCHEMA_VERSION):
                raise JournalError(
                    f"journal {self.path} has schema version {version}, this scheduler "
                    f"reads {SCHEMA_VERSION}; move it away or use another --journal"
                )
            migrate(self._conn, version)
        except sqlite3.DatabaseError as exc:
            self._lock_file.close()
            raise JournalError(f"journal {self.path} is not a usable SQLite file: {exc}") from exc
        private_file(self.path)  # the -wal/-shm companions SQLite just made
        self._dirty: dict[str, Request] = {}
        self._since: float | None = None  # when the oldest unwritten change was made
        self._scheduled = False
        self._last_commit = float("-inf")  # perf_counter() at the last commit's start
        self._forget: list[str] = []
        self._logged: list[str] = []
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name="journal-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self.commits = 0
        self.closed = False

    def _take_lock(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(f"{self.path}.lock", "ab")  # noqa: SIM115 (held for the journal's life)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise JournalError(
                f"journal {self.path} is in use by another scheduler; give each scheduler "
                "its own --journal (two reloading the same requests would run them twice)"
            ) from None
        return lock

    # ---- writing -------------------------------------------------------------

    def track(self, req: Request, mark: Mark | None = None) -> None:
        """From now on ``req``'s changes go through the journal (``mark``: what the
        file already holds, for a request reloaded from it)."""
        req.journal_mark = mark or Mark()
        req.on_change = self.changed
        if mark is None:
            self.changed(req)

    def changed(self, req: Request) -> None:
        """``req`` has news (admitted, predicted, text, ended): written at the next
        commit, published to its streams after it."""
        self._dirty[req.job.id] = req
        self._soon()

    def outcome(self, req: Request, outcome: Outcome) -> None:
        """The outcome-log row of a request that just ended, kept until that log has it."""
        mark: Mark | None = req.journal_mark
        if mark is not None:
            mark.outcome = outcome

    def logged(self, keys: list[str]) -> None:
        """The outcome log committed these requests' rows: drop the copies."""
        self._logged.extend(keys)
        self._soon()

    def forget(self, key: str) -> None:
        """The request is gone from the result store: delete its rows."""
        self._forget.append(key)
        self._soon()

    def _retry(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the caller commits again
        self._scheduled = True
        loop.call_later(RETRY_AFTER_S, self.commit)

    def _soon(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()
        if not self._scheduled:
            self._scheduled = True
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (tests, shutdown): the caller commits
                self._scheduled = False
                return
            wait = self._last_commit + COMMIT_GAP_S - time.perf_counter()
            if wait > 0:
                loop.call_later(wait, self.commit)
            else:
                loop.call_soon(self.commit)

    def commit(self) -> None:
        """Writes every change since the last commit in one transaction, then lets the
        changed requests publish (their streams get the text and ends just written)."""
        self._scheduled = False
        if self.closed:  # shutting down: the streams were ended, the file is shut
            self._dirty.clear()
            return
        dirty, self._dirty = self._dirty, {}
        forget, self._forget = self._forget, []
        logged, self._logged = self._logged, []
        since, self._since = self._since, None
        if not (dirty or forget or logged):
            return
        started = self._last_commit = time.perf_counter()
        now_mono, now_wall = self.clock.now(), time.time()
        try:
            self._conn.execute("BEGIN")
            deltas: list[tuple[str, str, int]] = []
            for req in dirty.values():
                self._write(req, now_mono, now_wall, deltas)
            if deltas:  # one statement for every stream's new text
                self._conn.executemany(
                    "INSERT INTO deltas(key, text, tokens) VALUES (?,?,?)", deltas
                )
            for key in logged:
                self._conn.execute(
                    "UPDATE requests SET outcome=NULL, embedding=NULL, prompt=NULL, messages=NULL "
                    "WHERE key=? AND final_code IS NOT NULL",
                    (key,),
                )
            for key in forget:
                self._conn.execute("DELETE FROM requests WHERE key=?", (key,))
                self._conn.execute("DELETE FROM deltas WHERE key=?", (key,))
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Nothing is published that is not written: the streams wait and the commit
            # is retried. A full disk shows here, in the log, naming the file.
            log.error(
                "journal %s: commit failed (%s); %d requests wait, retrying in %g s",
                self.path,
                exc,
                len(dirty),
                RETRY_AFTER_S,
            )
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            for req in dirty.values():  # written again from the start
                req.journal_mark = Mark(outcome=req.journal_mark.outcome)
            self._dirty.update(dirty)
            self._forget.extend(forget)
            self._logged.extend(logged)
            self._since = since
            metrics.JOURNAL_ERRORS.inc()
            self._retry()
            return
        self.commits += 1
        done = time.perf_counter()
        metrics.JOURNAL_COMMIT.observe(done - started)
        if since is not None:
            metrics.JOURNAL_DELAY.observe(done - since)
        for req in dirty.values():
            req.publish()

    def _write(
        self, req: Request, now_mono: float, now_wall: float, deltas: list[tuple[str, str, int]]
    ) -> None:
        """``req``'s news since the last commit: its new text as a row for ``deltas``
        (inserted together), everything else of its row in one UPDATE (prediction,
        dispatch and counts, the end: often several in one commit)."""
        mark: Mark = req.journal_mark
        job = req.job
        c = self._conn
        if not mark.admitted:
            c.execute(
                "INSERT OR REPLACE INTO requests(key, request_id, tenant, arrival, deadline,"
                " model, length_model, prompt, max_tokens, sampling, fingerprint,"
                " reattach_grace, messages) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    req.id,
                    req.tenant,
                    _wall(job.arrival, now_mono, now_wall),
                    _wall(job.deadline, now_mono, now_wall),
                    job.model,
                    job.length_model,
                    job.prompt,
                    job.max_tokens,
                    req.sampling.SerializeToString(),
                    b"".join(req.fingerprint),
                    req.reattach_grace_s,
                    chat.to_json(chat.messages_of(req)),
                ),
            )
            write_band(c, job.id, job.priority)
            c.execute("DELETE FROM deltas WHERE key=?", (job.id,))
            mark.admitted = True
        if len(req.text) > mark.chars:
            deltas.append((job.id, req.text[mark.chars :], req.tokens - mark.tokens))
            mark.chars, mark.tokens = len(req.text), req.tokens
        columns: list[str] = []
        values: list[Any] = []
        if req.accepted is not None and not mark.predicted:
            columns += PREDICTED_COLUMNS
            values += (job.predicted, job.prediction_source)
            mark.predicted = True
        meta = meta_of(req)
        if meta != mark.meta:
            columns += META_COLUMNS
            values += (
                _wall(job.first_dispatch, now_mono, now_wall),
                _wall(job.first_token, now_mono, now_wall),
                job.preemptions,
                job.requeues,
                req.worker_id,
                req.reattach_grace_s,
            )
            mark.meta = meta
        if req.final is not None and not req.interrupted and not mark.final:
            columns += FINAL_COLUMNS
            values += self._final_values(req, now_mono, now_wall)
            mark.final = True
        if columns:
            # A few combinations only, so SQLite's statement cache keeps each.
            c.execute(f"UPDATE requests SET {', '.join(columns)} WHERE key=?", (*values, job.id))

    def _final_values(self, req: Request, now_mono: float, now_wall: float) -> tuple[Any, ...]:
        """FINAL_COLUMNS' values: the end, and the outcome row until the log has it."""
        job = req.job
        mark: Mark = req.journal_mark
        final = req.final
        blob, code, message = None, 0, ""
        if isinstance(final, tuple):
            code, message = int(final[0].value[0]), str(final[1])
        else:
            blob = final.SerializeToString()
        outcome = mark.outcome
        row = None
        if outcome is not None:
            row = json.dumps(
                {k: v for k, v in outcome.__dict__.items() if k not in ("prompt", "embedding")}
            )
        mark.outcome = None
        return (
            int(job.state),
            job.finish_reason,
            _wall(req.finished_at, now_mono, now_wall),
            blob,
            code,
            message,
            row,
            embedding_blob(outcome.embedding) if outcome is not None else None,
            outcome.prompt if outcome is not None else None,
        )

    # ---- reading -------------------------------------------------------------

    def load(self, ttl_s: float) -> Loaded:
        """What the file holds: live requests, finished ones within ``ttl_s`` (older ones
        are deleted now), and finished ones the outcome log may not have yet."""
        loaded, stale = read(self._conn, time.time() - ttl_s)
        for key in stale:
            self.forget(key)
        return loaded

    # ---- lifecycle -----------------------------------------------------------

    def _checkpoints(self) -> None:
        """PASSIVE checkpoints on a connection of their own: never blocks the writer."""
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None)
        except sqlite3.Error:
            log.exception("journal %s: no checkpoints", self.path)
            return
        with contextlib.closing(conn):
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("journal %s: checkpoint failed: %s", self.path, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.commit()
        self.closed = True
        self._stop.set()
        self._checkpointer.join(timeout=5.0)
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._lock_file.close()


def journal_path(setting: str, port: int, run_dir: Path) -> Path | None:
    """``--journal``: a path, ``off``, or empty for one per public port in
    ``$SHORTLINE_JOURNAL_DIR`` (default: the run folder)."""
    if setting.strip().lower() == "off":
        return None
    if setting:
        return Path(setting)
    folder = os.environ.get("SHORTLINE_JOURNAL_DIR")
    return (Path(folder) if folder else run_dir) / f"scheduler-{port}.journal.sqlite"
