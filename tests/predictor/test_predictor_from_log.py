"""Training from the scheduler's outcome log: a small real run end to end (CLI -> card -> core),
from text rows and from digest rows that keep only the predictor's embedding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.predictor.core import PredictorCore, Query
from shortline import cli
from shortline.common.outcomes import Outcome, OutcomeLog

TOPICS = [
    "the moon", "tea", "rivers", "bridges", "owls", "copper", "jazz", "glaciers", "chess",
    "bread", "volcanoes", "trains", "maps", "bees", "silk", "comets", "lighthouses", "salt",
    "clocks", "deserts", "violins", "coral", "paper", "wolves", "kites",
]  # fmt: skip


def labelled_prompts() -> list[tuple[str, int, str]]:
    """(prompt, tokens, finish reason): short answers to yes/no and rhymes, long essays."""
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
    return rows


def write_log(path: Path, model: str) -> int:
    """The labelled prompts as text rows, plus noise rows."""
    rows = labelled_prompts()
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


# ---- digest logs: no text, the predictor's embedding instead --------------------


def row(rid: str, model: str, prompt: str, tokens: int, reason: str, **kw: object) -> Outcome:
    return Outcome(
        ts=0.0,
        request_id=rid,
        model=model,
        length_model=model,
        prompt=prompt,
        predicted_tokens=0.0,
        actual_tokens=tokens,
        queue_wait_s=0.0,
        ttft_s=0.0,
        completion_s=0.0,
        preemptions=0,
        finish_reason=reason,
        prediction_source="predictor",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def encoder() -> Any:
    from services.predictor.features.minilm import MiniLMEncoder

    return MiniLMEncoder(threads=2)


@pytest.fixture(scope="module")
def embeddings(encoder: Any) -> np.ndarray:
    """The stock sentence embedding of every labelled prompt: what the predictor returns."""
    from services.predictor.training.feature_cache import cached_features

    emb: np.ndarray = cached_features(encoder, [p for p, _, _ in labelled_prompts()])[0]
    return emb


def train(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    code = cli.main(["predictor", "train", "--head", "rank", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else {}), err


def test_train_from_a_digest_log_fits_on_the_stored_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoder: Any, embeddings: np.ndarray
) -> None:
    model = "digest-llm"
    log_path = tmp_path / "outcomes.sqlite"
    labelled = labelled_prompts()
    with OutcomeLog(log_path, prompts="digest") as log:
        for i, ((prompt, tokens, reason), vec) in enumerate(zip(labelled, embeddings, strict=True)):
            log.append(row(f"r{i}", model, prompt, tokens, reason, embedding=vec.tolist()))
        for j in range(3):  # the predictor did not answer: a digest and nothing to learn from
            log.append(row(f"f{j}", model, f"fallback prompt {j}", 50, "stop"))
    assert b"rhymes with" not in log_path.read_bytes()  # the log really holds no text
    out = tmp_path / "heads" / model
    code, summary, err = train(
        ["--target-model", model, "--from-log", str(log_path), "--out", str(out),
         "--max-epochs", "40"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert summary["head_input"] == "embedding"
    assert summary["rows"] == {"used": len(labelled), "skipped": {"no text and no embedding": 3}}
    assert "3 skipped: no text and no embedding" in err
    card = json.loads((out / "card.json").read_text())
    assert card["features"] == {"extractor": "minilm-embedding"}
    assert "384-d" in card["encoder"]["head_input"]
    assert "3 skipped" in card["data_source"]
    assert sum(card["split"]["rows"].values()) == len(labelled)
    # Every row had its embedding: no encoder was loaded (that alone takes seconds).
    assert card["training"]["embed_seconds"] < 0.5
    assert card["heads"]["rank"]["test_metrics"]["kendall_tau"] > 0.5
    # The predictor serves it: the minilm-embedding feature kind hands the head
    # the embedding of a new prompt.
    from services.predictor.core import PredictorCore, Query

    core = PredictorCore(out.parent)
    served = core.predict(
        Query(model, ["Answer yes or no: is snow blue?", "Write a long detailed essay on snow."])
    )
    assert served.tokens[1] > 5 * served.tokens[0]


def test_a_mixed_log_encodes_the_text_rows_and_splits_by_digest(
    tmp_path: Path, embeddings: np.ndarray
) -> None:
    from services.predictor.training import sources
    from shortline.common import dataset
    from shortline.common.outcomes import prompt_digest

    model = "mixed-llm"
    log_path = tmp_path / "outcomes.sqlite"
    labelled = labelled_prompts()
    with OutcomeLog(log_path) as log:  # an older text-mode stretch
        for i, (prompt, tokens, reason) in enumerate(labelled[:40]):
            log.append(row(f"t{i}", model, prompt, tokens, reason))
    with OutcomeLog(log_path, prompts="digest") as log:
        for i, (prompt, tokens, reason) in enumerate(labelled[40:], start=40):
            log.append(row(f"d{i}", model, prompt, tokens, reason, embedding=embeddings[i]))
    data = sources.from_outcome_log(log_path, model)
    assert data.embeddings is not None and data.skipped == {}
    assert np.isnan(data.embeddings[:40]).all() and not np.isnan(data.embeddings[40:]).any()
    assert data.instructions[0] == labelled[0][0]  # text rows keep their text to be encoded
    assert data.instructions[40] == f"sha256:{prompt_digest(labelled[40][0])}"
    assert list(data.splits) == [dataset.split_of(prompt_digest(p)) for p, _, _ in labelled]
    assert "input embedding (" in data.source and f"({len(labelled) - 40} stored)" in data.source
    # Text only: the digest rows are left out, and said so.
    text_only = sources.from_outcome_log(log_path, model, "text")
    assert text_only.embeddings is None and len(text_only.instructions) == 40
    assert sum(text_only.skipped.values()) == len(labelled) - 40


def test_a_digest_log_without_embeddings_is_refused_naming_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_path = tmp_path / "outcomes.sqlite"
    with OutcomeLog(log_path, prompts="digest") as log:
        for i in range(20):
            log.append(row(f"r{i}", "m", f"prompt {i}", 10 + i, "stop"))
    code, _, err = train(["--target-model", "m", "--from-log", str(log_path)], capsys)
    assert code == 2
    assert "20 skipped: no text and no embedding" in err
    assert "predictor" in err
    assert str(log_path) in err


@pytest.mark.slow
async def test_a_digest_mode_scheduler_logs_the_predictors_embedding_not_the_prompt(
    embedded_triton: Any, tmp_path: Path
) -> None:
    """The scheduler's side of the loop: real predictor, scheduler and worker on 127.0.0.1."""
    import asyncio

    import grpc

    from services.predictor.config import PredictorConfig
    from services.predictor.service import PredictorServer
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.service.server import SchedulerServer
    from services.worker.config import WorkerConfig
    from services.worker.service.server import WorkerServer
    from shortline.common.net import free_port
    from shortline.common.outcomes import prompt_digest, read_rows
    from shortline.common.v1 import common_pb2
    from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc
    from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

    secret = "Summarise my medical file; my password is hunter2-correct-horse."
    log_path = tmp_path / "outcomes.sqlite"
    pcfg = PredictorConfig(port=free_port(), threads=1)
    predictor = PredictorServer(pcfg)
    await predictor.start()
    scheduler = SchedulerServer(
        SchedulerConfig(
            host="127.0.0.1", port=free_port(), internal_port=0, heartbeat_interval_s=0.2,
            predictor=pcfg.address, predictor_timeout_ms=5000, outcome_log=str(log_path),
            outcome_log_prompts="digest",
        )
    )  # fmt: skip
    worker = WorkerServer(
        WorkerConfig(
            triton=embedded_triton.grpc_url, slots=2, worker_id="w0", health_poll_s=0.5,
            scheduler=scheduler.internal_address,
        ),
        embedded_triton.grpc_url,
    )  # fmt: skip
    try:
        await scheduler.start()
        await worker.start()
        for _ in range(500):
            if scheduler.plane.workers:
                break
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            call = stub.Generate(
                scheduler_pb2.GenerateRequest(
                    request_id="secret-1", model="replay", prompt=secret, max_tokens=5,
                    length_model="Meta-Llama-3-8B-Instruct",
                    sampling=common_pb2.SamplingParams(ignore_eos=True),
                ),
                timeout=60,
            )  # fmt: skip
            msgs = [m async for m in call]
        assert msgs[-1].result.actual_tokens == 5
        assert msgs[-1].result.prediction_source == scheduler_pb2.PREDICTION_SOURCE_PREDICTOR
        async with grpc.aio.insecure_channel(pcfg.address) as channel:
            reply = await predictor_pb2_grpc.PredictorServiceStub(channel).Predict(
                predictor_pb2.PredictRequest(
                    target_model="Meta-Llama-3-8B-Instruct", prompts=[secret],
                    return_embedding=True,
                ),
                timeout=30,
            )  # fmt: skip
    finally:
        await worker.stop(0.1)
        await scheduler.stop(0.1)  # flushes the log
        await predictor.stop(0.1)
    assert b"hunter2" not in log_path.read_bytes()
    (logged,) = read_rows(log_path, "Meta-Llama-3-8B-Instruct")
    assert logged.prompt is None and logged.prompt_sha256 == prompt_digest(secret)
    assert logged.embedding is not None
    expected = np.asarray(reply.predictions[0].embedding, dtype=np.float32)
    assert logged.embedding.shape == expected.shape == (384,)
    assert float(logged.embedding @ expected) > 0.999
