"""The outcome log: the schema the predictor trains from, durable in WAL mode."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from shortline.common.outcomes import Outcome, OutcomeLog, read_lengths


def outcome(i: int, reason: str = "stop") -> Outcome:
    return Outcome(
        ts=1.0 + i,
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
        "finish_reason", "prediction_source",
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
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_lengths(tmp_path / "nope.sqlite", "m")
