"""The outcome log: the schema the predictor trains from, durable in WAL mode,
private (0600, retention, prompt digests) and readable across schema versions."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shortline.common.outcomes import (
    Outcome,
    OutcomeLog,
    prompt_digest,
    read_lengths,
    read_rows,
)


def outcome(i: int, reason: str = "stop", ts: float | None = None, **kw: object) -> Outcome:
    fields: dict[str, object] = dict(
        ts=1.0 + i if ts is None else ts,
        request_id=f"r{i}",
        model="replay",
        length_model="Meta-Llama-3-8B-Instruct",
        prompt=f"prompt {i}",
        predicted_tokens=100.5,
        actual_tokens=90 + i,
        queue_wait_s=0.1,
        ttft_s=0.2,
        completion_s=1.5,
        preemptions=0,
        finish_reason=reason,
        prediction_source="predictor",
    )
    fields.update(kw)
    return Outcome(**fields)  # type: ignore[arg-type]


def test_rows_land_in_the_documented_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.sqlite"
    log = OutcomeLog(path, batch_rows=2)
    assert log.append(outcome(0)) is False
    assert log.append(outcome(1, "cancelled")) is True  # batch full: flush is due
    assert log.flush() == 2
    log.append(outcome(2, "length"))
    log.close()  # flushes the rest
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [r[1] for r in conn.execute("PRAGMA table_info(outcomes)")]
    assert cols == [
        "id", "ts", "request_id", "model", "length_model", "prompt", "predicted_tokens",
        "actual_tokens", "queue_wait_s", "ttft_s", "completion_s", "preemptions",
        "finish_reason", "prediction_source", "prompt_sha256", "prompt_chars", "embedding",
    ]  # fmt: skip
    rows = conn.execute(
        "SELECT request_id, actual_tokens FROM outcomes WHERE length_model = ?"
        " AND finish_reason IN ('stop', 'length') ORDER BY id",
        ("Meta-Llama-3-8B-Instruct",),
    ).fetchall()
    assert rows == [("r0", 90), ("r2", 92)]


def test_reopening_appends_to_the_same_table(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with OutcomeLog(path) as log:
        log.append(outcome(0))
    with OutcomeLog(path) as log:
        log.append(outcome(1))
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == 2


def test_the_reader_returns_only_finished_rows_of_one_length_model(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with OutcomeLog(path) as log:
        for i, reason in enumerate(["stop", "cancelled", "length", "error", "stop"]):
            log.append(outcome(i, reason))
        other = outcome(9)
        log.append(Outcome(**{**other.__dict__, "length_model": "other-model", "request_id": "x"}))
    rows = read_lengths(path, "Meta-Llama-3-8B-Instruct")
    assert rows == [("prompt 0", 90), ("prompt 2", 92), ("prompt 4", 94)]
    assert read_lengths(path, "unknown-model") == []


def test_the_reader_names_a_missing_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lengths(tmp_path / "nope.sqlite", "m")


# ---- privacy: file modes -----------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: whatever the log does not force itself would come out world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_file_and_its_wal_and_shm_are_0600_after_writes(
    tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "logs" / "outcomes.sqlite"
    log = OutcomeLog(path, batch_rows=1)
    for i in range(3):
        log.append(outcome(i))
        log.flush()
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    assert wal.exists() and shm.exists()  # open writer: WAL mode keeps both
    assert {p.name: mode(p) for p in (path, wal, shm)} == {
        path.name: 0o600,
        wal.name: 0o600,
        shm.name: 0o600,
    }
    log.close()
    assert mode(path) == 0o600


def test_an_existing_world_readable_log_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.sqlite"
    with OutcomeLog(path) as log:
        log.append(outcome(0))
    path.chmod(0o644)
    with (
        caplog.at_level(logging.WARNING, logger="shortline.common.outcomes"),
        OutcomeLog(path) as log,
    ):
        log.append(outcome(1))
    assert mode(path) == 0o600
    assert any("644" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == 2


# ---- retention -----------------------------------------------------------------


def request_ids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    return [r[0] for r in conn.execute("SELECT request_id FROM outcomes ORDER BY id")]


def test_retention_keeps_the_newest_max_rows(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with OutcomeLog(path, max_rows=5, retention_every_s=0.0) as log:
        for i in range(12):
            log.append(outcome(i, ts=time.time()))
        log.flush()
        assert log.pruned == 7
    assert request_ids(path) == [f"r{i}" for i in range(7, 12)]


def test_retention_deletes_rows_older_than_max_age(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    now = time.time()
    with OutcomeLog(path) as log:  # no retention: the old rows land
        log.append(outcome(0, ts=now - 3 * 86400))
        log.append(outcome(1, ts=now - 2 * 86400))
        log.append(outcome(2, ts=now - 60))
    with OutcomeLog(path, max_age_s=86400.0) as log:  # applied when the log opens
        assert log.pruned == 2
        log.append(outcome(3, ts=now))
    assert request_ids(path) == ["r2", "r3"]


def test_retention_runs_periodically_not_at_every_flush(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    log = OutcomeLog(path, max_rows=2, retention_every_s=3600.0)
    for i in range(5):
        log.append(outcome(i, ts=time.time()))
        log.flush()
    assert len(request_ids(path)) == 5  # applied at open only; next one due in an hour
    assert log.prune() == 3
    assert request_ids(path) == ["r3", "r4"]
    log.close()


def test_bad_settings_are_refused_before_any_file_is_made(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with pytest.raises(ValueError, match=r"text, digest .*--outcome-log-prompts.*'clear'"):
        OutcomeLog(path, prompts="clear")
    with pytest.raises(ValueError, match="--outcome-log-max-rows"):
        OutcomeLog(path, max_rows=-1)
    assert not path.exists()


# ---- digest mode ---------------------------------------------------------------

SECRET = "my password is hunter2-correct-horse; summarise my medical file"


def raw_bytes(path: Path) -> bytes:
    return b"".join(
        p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )


def test_digest_mode_stores_the_digest_and_embedding_never_the_text(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    vector = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    log = OutcomeLog(path, prompts="digest")
    assert log.wants_embeddings
    log.append(outcome(0, prompt=SECRET, embedding=vector.tolist()))
    log.append(outcome(1, prompt=SECRET + " (no embedding)", embedding=None))
    log.flush()
    secret = SECRET.encode()
    assert secret not in raw_bytes(path)  # neither in the database nor in the WAL
    assert b"hunter2" not in raw_bytes(path)
    log.close()
    assert b"hunter2" not in raw_bytes(path)
    conn = sqlite3.connect(path)
    rows = conn.execute(
        "SELECT prompt, prompt_sha256, prompt_chars, length(embedding) FROM outcomes ORDER BY id"
    ).fetchall()
    assert rows[0] == (None, hashlib.sha256(secret).hexdigest(), len(SECRET), 384 * 4)
    assert rows[1][0] is None and rows[1][3] is None
    read = read_rows(path, "Meta-Llama-3-8B-Instruct")
    assert read[0].prompt is None and read[0].prompt_sha256 == prompt_digest(SECRET)
    assert read[0].embedding is not None
    np.testing.assert_array_equal(read[0].embedding, vector)
    assert read[1].embedding is None
    assert read_lengths(path, "Meta-Llama-3-8B-Instruct") == []  # no text to give


def test_text_mode_keeps_the_text_and_its_digest_but_no_embedding(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with OutcomeLog(path) as log:
        log.append(outcome(0, prompt=SECRET, embedding=[0.5] * 384))
    (row,) = read_rows(path, "Meta-Llama-3-8B-Instruct")
    assert row.prompt == SECRET and row.prompt_sha256 == prompt_digest(SECRET)
    assert row.embedding is None


# ---- migration -----------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE outcomes(
  id INTEGER PRIMARY KEY, ts REAL, request_id TEXT, model TEXT, length_model TEXT,
  prompt TEXT, predicted_tokens REAL, actual_tokens INTEGER, queue_wait_s REAL,
  ttft_s REAL, completion_s REAL, preemptions INTEGER, finish_reason TEXT,
  prediction_source TEXT
)
"""


def old_log(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO outcomes(ts, request_id, model, length_model, prompt, actual_tokens,"
        " finish_reason) VALUES (1.0, 'old', 'replay', 'm', 'an old prompt', 42, 'stop')"
    )
    conn.commit()
    conn.close()


def test_an_old_log_is_read_as_is_and_migrated_by_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old_log(path)
    (row,) = read_rows(path, "m")  # read-only: no migration needed to read it
    assert (row.prompt, row.prompt_sha256, row.embedding, row.actual_tokens) == (
        "an old prompt",
        None,
        None,
        42,
    )
    with OutcomeLog(path, prompts="digest") as log:
        log.append(outcome(1, length_model="m", prompt="new", embedding=[1.0, 0.0]))
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(outcomes)")]
    assert cols[-3:] == ["prompt_sha256", "prompt_chars", "embedding"]
    old, new = read_rows(path, "m")
    assert old.prompt == "an old prompt" and old.embedding is None
    assert new.prompt is None and new.prompt_sha256 == prompt_digest("new")
    assert new.embedding is not None and new.embedding.tolist() == [1.0, 0.0]
    assert mode(path) == 0o600


def test_a_file_that_is_not_a_log_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database at all, just some text " * 50)
    with pytest.raises(ValueError, match=r"notes\.sqlite"):
        read_rows(path, "m")


def test_two_writers_share_one_log_without_locking_each_other_out(tmp_path: Path) -> None:
    # A restarted scheduler opens the log while the old one still has it open
    # (benchmarks do this; so do two stacks on one machine).
    path = tmp_path / "outcomes.sqlite"
    with OutcomeLog(path, max_rows=1000) as first:  # opened, retention ran, nothing written
        second = OutcomeLog(path, max_rows=1000)  # its retention must not find the file locked
        try:
            first.append(outcome(0, ts=time.time()))
            first.flush()
            second.append(outcome(1, ts=time.time()))
            second.flush()
            first.append(outcome(2, ts=time.time()))
            first.flush()
        finally:
            second.close()
    with sqlite3.connect(path) as conn:
        ids = sorted(r[0] for r in conn.execute("SELECT request_id FROM outcomes"))
    assert ids == ["r0", "r1", "r2"]
