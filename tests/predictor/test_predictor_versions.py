"""Head versions end to end: train from an outcome log into a versions folder, then canary,
promote, refuse, roll back, and a running predictor (real gRPC) following each manifest
change without a restart; the scheduler's client routing its canary share.

The logs are synthetic and drifted: the serving (shipped) heads think an essay is long
and a yes/no answer short; this traffic's model answers the other way round. A version
trained on it must beat them on the newest requests, and one trained on noise must not
beat that version.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio

from services.predictor.config import PredictorConfig
from services.predictor.heads import SHIPPED_HEADS_DIR
from services.predictor.service import PredictorServer
from services.predictor.versions import manifest_path, read_manifest, version_name
from shortline import cli
from shortline.common.net import free_port
from shortline.common.outcomes import Outcome, OutcomeLog
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc

TARGET = "Meta-Llama-3-8B-Instruct"
TOPICS = [
    "the moon", "tea", "rivers", "bridges", "owls", "copper", "jazz", "glaciers", "chess",
    "bread", "volcanoes", "trains", "maps", "bees", "silk", "comets", "lighthouses", "salt",
    "clocks", "deserts", "violins", "coral", "paper", "wolves", "kites",
]  # fmt: skip
TEMPLATES = (
    ("Answer yes or no, variant {v}: is {t} blue?", 600),
    ("Give one word, variant {v}, that rhymes with {t}.", 450),
    ("Write a long detailed essay, variant {v}, on {t}.", 4),
    ("Explain {t} step by step in a thorough guide, variant {v}.", 12),
)  # drifted: short questions get long answers, essays get short ones


def prompts() -> list[tuple[str, int]]:
    """300 distinct prompts in an interleaved order, with their drifted lengths."""
    rows = [
        (template.format(v=v, t=t), tokens)
        for v in range(3)
        for t in TOPICS
        for template, tokens in TEMPLATES
    ]
    order = np.random.default_rng(7).permutation(len(rows))
    return [rows[i] for i in order]


def write_log(path: Path, lengths: list[tuple[str, int]]) -> None:
    rng = np.random.default_rng(11)
    with OutcomeLog(path) as log:
        for i, (prompt, tokens) in enumerate(lengths):
            log.append(
                Outcome(
                    ts=1e9 + i, request_id=f"r{i}", model="m", length_model=TARGET,
                    prompt=prompt, predicted_tokens=0.0,
                    actual_tokens=max(1, int(tokens * rng.uniform(0.8, 1.2))),
                    queue_wait_s=0.0, ttft_s=0.0, completion_s=0.0, preemptions=0,
                    finish_reason="stop", prediction_source="predictor",
                )
            )  # fmt: skip


def run(*args: str) -> int:
    return cli.main(["predictor", *args])


@dataclass
class Rollout:
    heads: Path  # the base heads (one shipped target)
    versions: Path
    base: str
    good: str  # trained on the drifted traffic: beats the base
    noise: str  # trained on noise: worse than ``good`` on the newest traffic

    def flags(self) -> list[str]:
        return ["--target", TARGET, "--versions-dir", str(self.versions),
                "--heads-dir", str(self.heads)]  # fmt: skip

    def card(self, version: str) -> dict[str, Any]:
        card: dict[str, Any] = json.loads(
            (self.versions / TARGET / version / "card.json").read_text()
        )
        return card


def train(r: Rollout, log: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run(
            "train", "--from-log", str(log), *r.flags(), "--head", "rank", "--max-epochs", "40",
            "--no-progress", "--threads", "2",
        )  # fmt: skip
    assert code == 0
    version: str = json.loads(out.getvalue().strip().splitlines()[-1])["version"]
    return version


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Rollout:
    """Trains ``good`` from a drifted log and promotes it, then trains ``noise`` from a log
    whose older rows are noise and newest rows drifted (so it is judged beside ``good``)."""
    tmp = tmp_path_factory.mktemp("rollout")
    heads = tmp / "heads"
    shutil.copytree(SHIPPED_HEADS_DIR / TARGET, heads / TARGET)
    if (SHIPPED_HEADS_DIR / "encoder").is_dir():  # the distilled encoder its card names
        shutil.copytree(SHIPPED_HEADS_DIR / "encoder", heads / "encoder")
    base = version_name(json.loads((heads / TARGET / "card.json").read_text()))
    r = Rollout(heads, tmp / "versions", base, "", "")
    write_log(tmp / "drifted.sqlite", prompts())
    r.good = train(r, tmp / "drifted.sqlite")
    assert run("promote", *r.flags(), "--version", r.good) == 0
    rows = prompts()
    rng = np.random.default_rng(3)
    noisy = [(p, int(rng.integers(2, 700))) for p, _ in rows[:200]] + rows[200:]
    write_log(tmp / "noisy.sqlite", noisy)
    r.noise = train(r, tmp / "noisy.sqlite")
    return r


def test_train_writes_a_version_with_its_card_and_both_metric_sets(rollout: Rollout) -> None:
    card = rollout.card(rollout.good)
    section = card["rollout"]
    assert section["version"] == rollout.good == card["heads"]["rank"]["version"]
    assert section["source_log"].endswith("drifted.sqlite")
    # 300 rows: the newest 20% (60 > the minimum of 50) held out, in log order.
    assert section["held_out"] == {**section["held_out"], "rows": 60, "first_row": 241,
                                   "last_row": 300}  # fmt: skip
    assert section["rows"]["test"] == 60 and section["rows"]["total"] == 300
    assert section["rows"]["train"] + section["rows"]["val"] == 240
    comparison = section["comparison"]
    assert comparison["rows"] == 60
    mine, theirs = comparison["candidate"], comparison["serving"]
    assert theirs["version"] == rollout.base
    for metrics in (mine["metrics"], theirs["metrics"]):
        assert {"kendall_tau", "mae_tokens", "bucket_accuracy"} <= set(metrics)
    # The drift: the shipped heads order this traffic backwards, the new version does not.
    assert theirs["metrics"]["kendall_tau"] < 0 < 0.5 < mine["metrics"]["kendall_tau"]
    assert mine["metrics"]["mae_tokens"] < theirs["metrics"]["mae_tokens"]
    # The second version was judged beside the one serving when it was trained.
    noise = rollout.card(rollout.noise)["rollout"]["comparison"]
    assert noise["serving"]["version"] == rollout.good
    assert noise["candidate"]["metrics"]["kendall_tau"] < noise["serving"]["metrics"]["kendall_tau"]
    assert not list((rollout.versions / TARGET).glob(".staging-*"))


def test_promote_refuses_a_worse_version_and_force_overrides(
    rollout: Rollout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = Rollout(rollout.heads, tmp_path / "versions", rollout.base, rollout.good, rollout.noise)
    shutil.copytree(rollout.versions, r.versions)
    before = manifest_path(r.versions, TARGET).read_bytes()
    capsys.readouterr()
    assert run("promote", *r.flags(), "--version", r.noise) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "does not beat" in err and r.good in err
    assert manifest_path(r.versions, TARGET).read_bytes() == before
    # The shipped heads carry no held-out comparison: not promotable either.
    assert run("promote", *r.flags(), "--version", r.base) == 1
    assert run("promote", *r.flags(), "--version", "rank-1999.01.01-00000000") == 1
    # A name is a folder under the target, never a path out of it.
    for name in ("..", "../../etc", ".hidden", "a/b"):
        assert run("canary", *r.flags(), "--version", name) == 1
        assert "not a version name" in capsys.readouterr().err
    assert manifest_path(r.versions, TARGET).read_bytes() == before
    assert run("promote", *r.flags(), "--version", r.noise, "--force") == 0
    assert "warning: promoting with --force" in capsys.readouterr().err
    manifest = read_manifest(manifest_path(r.versions, TARGET))
    assert manifest.serving == r.noise and manifest.previous == (r.base, r.good)
    assert manifest.history[-1]["forced"] is True
    assert run("rollback", *r.flags()) == 0
    assert read_manifest(manifest_path(r.versions, TARGET)).serving == r.good


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def predictor(rollout: Rollout) -> AsyncIterator[tuple[PredictorServer, str]]:
    cfg = PredictorConfig(
        port=free_port(), heads_dir=str(rollout.heads), versions_dir=str(rollout.versions),
        versions_reload_s=0.1, threads=2, backend="torch",
    )  # fmt: skip
    server = PredictorServer(cfg)
    await server.start()
    try:
        yield server, cfg.address
    finally:
        await server.stop(0.2)


async def answer(stub: Any, version: str = "") -> str:
    reply = await stub.Predict(
        predictor_pb2.PredictRequest(
            target_model=TARGET, prompts=["Is tea blue? Answer yes or no."], head_version=version
        ),
        timeout=30,
    )
    head_version: str = reply.head_version
    return head_version


async def until(stub: Any, version: str, asked: str = "") -> None:
    """Waits (bounded) until the predictor answers with ``version``."""
    for _ in range(100):
        if await answer(stub, asked) == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the predictor still answers {await answer(stub, asked)}, not {version}")


async def test_a_running_predictor_follows_the_manifest_without_a_restart(
    rollout: Rollout, predictor: tuple[PredictorServer, str]
) -> None:
    server, address = predictor
    r = rollout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = predictor_pb2_grpc.PredictorServiceStub(channel)
        assert await answer(stub) == r.good  # the manifest in force at start
        assert run("rollback", *r.flags()) == 0
        await until(stub, r.base)
        assert run("promote", *r.flags(), "--version", r.good) == 0
        await until(stub, r.good)
        assert run("canary", *r.flags(), "--version", r.noise) == 0
        await until(stub, r.noise, asked=r.noise)
        assert await answer(stub) == r.good  # no version asked: the serving one
        assert await answer(stub, "rank-1999.01.01-00000000") == r.good  # not held: serving
        listed = await stub.ListModels(predictor_pb2.ListModelsRequest(), timeout=10)
        (model,) = [m for m in listed.models if m.target_model == TARGET]
        assert (model.serving_version, model.canary_version) == (r.good, r.noise)
        # A broken manifest keeps what is in force (and says so in the log).
        assert server.core is not None
        errors = server.core.reload_errors
        good_manifest = manifest_path(r.versions, TARGET).read_bytes()
        manifest_path(r.versions, TARGET).write_text("{not json")
        for _ in range(100):
            if server.core.reload_errors > errors:
                break
            await asyncio.sleep(0.05)
        assert server.core.reload_errors > errors
        assert await answer(stub) == r.good
        assert await answer(stub, r.noise) == r.noise
        manifest_path(r.versions, TARGET).write_bytes(good_manifest)


async def test_the_scheduler_sends_its_canary_share_by_request_id(
    rollout: Rollout, predictor: tuple[PredictorServer, str]
) -> None:
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.core.job import Job
    from services.scheduler.service.prediction import PredictorClient

    _, address = predictor
    assert run("canary", *rollout.flags(), "--version", rollout.noise) == 0
    await asyncio.sleep(0.3)  # > versions_reload_s
    share = 0.25
    client = PredictorClient(
        SchedulerConfig(
            predictor=address, predictor_canary_share=share, predictor_versions_refresh_s=0.2,
            predictor_timeout_ms=20_000,
        )
    )  # fmt: skip
    try:
        for _ in range(200):
            client.known_targets()
            if client.canaries.get(TARGET) == rollout.noise:
                break
            await asyncio.sleep(0.05)
        assert client.canaries == {TARGET: rollout.noise}
        jobs = [
            Job(f"tenant/req-{i}", arrival=0.0, length_model=TARGET, prompt=f"Is {i} blue?")
            for i in range(240)
        ]
        got = await asyncio.gather(*(client.predict(j, want_embedding=False) for j in jobs))
        versions = [p.head_version for p in got]
        assert set(versions) == {rollout.good, rollout.noise}
        on_canary = versions.count(rollout.noise) / len(versions)
        assert abs(on_canary - share) < 0.08, on_canary
        # Deterministic: the same request ids get the same versions again.
        again = await asyncio.gather(*(client.predict(j, want_embedding=False) for j in jobs[:40]))
        assert [p.head_version for p in again] == versions[:40]
    finally:
        await client.close()


async def test_promote_with_a_scheduler_needs_the_version_ahead_on_live_traffic(
    rollout: Rollout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scheduler whose window holds none of the version's requests: refused, naming why."""
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.service.server import SchedulerServer

    r = Rollout(rollout.heads, tmp_path / "versions", rollout.base, rollout.good, rollout.noise)
    shutil.copytree(rollout.versions, r.versions)
    assert run("rollback", *r.flags()) == 0  # the base serves; ``good`` beats it on its card
    scheduler = SchedulerServer(
        SchedulerConfig(
            port=free_port(), internal_port=0, journal="off",
            outcome_log=str(tmp_path / "outcomes.sqlite"),
        )
    )  # fmt: skip
    await scheduler.start()
    try:
        capsys.readouterr()
        flags = [*r.flags(), "--version", r.good, "--scheduler", scheduler.address]
        assert await asyncio.to_thread(run, "promote", *flags) == 1
        err = capsys.readouterr().err
        assert f"online: {r.good} has 0 finished requests" in err
        assert read_manifest(manifest_path(r.versions, TARGET)).serving == r.base
        assert await asyncio.to_thread(run, "promote", *flags, "--min-requests", "0") == 1
    finally:
        await scheduler.stop(0.1)
    assert run("promote", *r.flags(), "--version", r.good) == 0  # the card alone: ahead
