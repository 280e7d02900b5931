"""Training from the scheduler's outcome log: a small real run end to end (CLI -> card -> core)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.predictor.core import PredictorCore, Query
from shortline import cli
from shortline.common.outcomes import Outcome, OutcomeLog

TOPICS = [
    "the moon", "tea", "rivers", "bridges", "owls", "copper", "jazz", "glaciers", "chess",
    "bread", "volcanoes", "trains", "maps", "bees", "silk", "comets", "lighthouses", "salt",
    "clocks", "deserts", "violins", "coral", "paper", "wolves", "kites",
]  # fmt: skip


def write_log(path: Path, model: str) -> int:
    """Short yes/no questions answered briefly, essays answered at length, plus noise rows."""
    rows = []
    for i, topic in enumerate(TOPICS * 4):
        variant = i // len(TOPICS)
        rows.append((f"Answer yes or no, variant {variant}: is {topic} blue?", 3 + variant, "stop"))
        rows.append((f"Give one word, variant {variant}, that rhymes with {topic}.", 2, "stop"))
        rows.append(
            (f"Write a long detailed essay, variant {variant}, on {topic}.", 700 + 9 * i, "length")
        )
        rows.append(
            (f"Explain {topic} step by step in a thorough guide, variant {variant}.", 500, "stop")
        )
    extra = [
        ("c1", model, "Cancelled request", 5, "cancelled"),
        ("o1", "other-model", "Other model row", 9, "stop"),
    ]
    with OutcomeLog(path) as log:
        for rid, length_model, prompt, tokens, reason in [
            (f"r{i}", model, p, n, f) for i, (p, n, f) in enumerate(rows)
        ] + extra:
            log.append(
                Outcome(
                    ts=0.0,
                    request_id=rid,
                    model=length_model,
                    length_model=length_model,
                    prompt=prompt,
                    predicted_tokens=0.0,
                    actual_tokens=tokens,
                    queue_wait_s=0.0,
                    ttft_s=0.0,
                    completion_s=0.0,
                    preemptions=0,
                    finish_reason=reason,
                    prediction_source="predictor",
                )
            )
    return len(rows)


def test_train_from_outcome_log_writes_a_servable_head(tmp_path: Path) -> None:
    model = "my-served-llm"
    log_path = tmp_path / "outcomes.sqlite"
    n_rows = write_log(log_path, model)
    out = tmp_path / "heads" / model
    code = cli.main(
        [
            "predictor", "train", "--target-model", model, "--from-log", str(log_path),
            "--out", str(out), "--head", "rank", "--max-epochs", "40", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    card = json.loads((out / "card.json").read_text())
    assert "outcome log" in card["data_source"]
    assert sum(card["split"]["rows"].values()) == n_rows  # cancelled and other-model rows dropped
    assert set(card["heads"]) == {"rank"}
    assert card["heads"]["rank"]["test_metrics"]["kendall_tau"] > 0.5
    core = PredictorCore(tmp_path / "heads")
    result = core.predict(
        Query(model, ["Answer yes or no: is snow blue?", "Write a long detailed essay on snow."])
    )
    assert result.head_version == card["heads"]["rank"]["version"]
    assert result.tokens[1] > 5 * result.tokens[0]


def test_missing_log_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["predictor", "train", "--target-model", "m", "--from-log", str(tmp_path / "none.db")]
    )
    assert code == 2
    assert "none.db" in capsys.readouterr().err
