"""``shortline simulate --workload FILE`` and ``--from-log PATH``: an operator's own
requests replayed under every policy.

The hand-checked case: one worker, no batching, a decode step of 9 + 1 ms (10 ms per
token), no prefill. Three requests arrive 1 ms apart with 100, 30 and 10 tokens. fcfs
runs them in arrival order; the oracle runs the 100-token one (alone at first), then
10, then 30.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.scheduler.core.batching import Batching, BatchingMode
from services.scheduler.core.policies import make_policy
from services.scheduler.sim import traffic
from services.scheduler.sim.engine import simulate
from services.scheduler.sim.runner import SimulateConfig, main, run
from services.scheduler.sim.service_model import ServiceModel
from shortline.common.outcomes import Outcome, OutcomeLog

STEP_S = 0.010
MODEL = ServiceModel(step_a_s=0.009, step_b_s=0.001)
ARRIVALS = [0.0, 0.001, 0.002]
TRUE = [100, 30, 10]
GOOD = [90.0, 40.0, 8.0]  # ranks as the truth: ssjf does what the oracle does
BAD = [90.0, 5.0, 50.0]  # ranks 30 before 10: ssjf does what fcfs does


def finishes(order: list[int]) -> dict[int, float]:
    """When each job ends on one worker serving them back to back in ``order`` (the
    first one starts at its arrival, the others are waiting by then)."""
    t = ARRIVALS[order[0]]
    out = {}
    for j in order:
        t = max(t, ARRIVALS[j]) + TRUE[j] * STEP_S
        out[j] = t
    return out


FCFS_JCT = [finishes([0, 1, 2])[j] - ARRIVALS[j] for j in range(3)]
ORACLE_JCT = [finishes([0, 2, 1])[j] - ARRIVALS[j] for j in range(3)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines))
    return path


def config(**kw: Any) -> SimulateConfig:
    settings: dict[str, Any] = {
        "workers": 1,
        "slots": 1,
        "batching": "none",
        "policies": "fcfs,ssjf,sjf-oracle",
        "step_a_ms": 9.0,
        "step_b_ms": 1.0,
        "predictor": "oracle",  # fills only rows without a prediction
    }
    return SimulateConfig(**{**settings, **kw})


def rows_by_policy(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["policy"]: r for r in report["rows"]}


def test_jsonl_workload_gives_the_hand_checked_jcts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "w.jsonl",
        [
            {"arrival_s": a, "true_tokens": t, "predicted_tokens": p}
            for a, t, p in zip(ARRIVALS, TRUE, GOOD, strict=True)
        ],
    )
    work = traffic.to_workload(
        traffic.read_workload_file(path),
        predictor_spec="real",
        target_model="unused",
        rng=np.random.default_rng(0),
        predictor=None,
    )
    for spec, expected in (("fcfs", FCFS_JCT), ("sjf-oracle", ORACLE_JCT), ("ssjf", ORACLE_JCT)):
        r = simulate(
            work,
            make_policy(spec, allow_oracle=True),
            Batching(BatchingMode.NONE, 1),
            workers=1,
            slots=1,
            model=MODEL,
        )
        np.testing.assert_allclose(r.finish - r.arrival, expected, rtol=1e-9, err_msg=spec)

    rows = rows_by_policy(run(config(workload=str(path))))
    assert rows["fcfs"]["mean_jct_s"] == pytest.approx(np.mean(FCFS_JCT))
    assert rows["fcfs"]["p50_jct_s"] == pytest.approx(np.median(FCFS_JCT))
    assert rows["sjf-oracle"]["mean_jct_s"] == pytest.approx(np.mean(ORACLE_JCT))
    assert rows["ssjf"]["oracle_share"] == pytest.approx(1.0)


def test_csv_workload_in_any_order_with_bad_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        f"{t},{a},{p},,1,tenant-{i}"
        for i, (a, t, p) in enumerate(zip(ARRIVALS, TRUE, BAD, strict=True))
    ]
    path = write_csv(
        tmp_path / "w.csv",
        "true_tokens,arrival_s,predicted_tokens,prompt,priority,tenant",
        lines[::-1],  # the file's order is not the arrival order
    )
    loaded = traffic.read_workload_file(path)
    assert loaded.arrivals.tolist() == ARRIVALS
    assert loaded.priority is not None and loaded.priority.tolist() == [1, 1, 1]
    assert loaded.tenant == ["tenant-0", "tenant-1", "tenant-2"]

    cfg = config(workload=str(path), out=str(tmp_path / "report.json"))
    assert main(cfg) == 0
    printed = capsys.readouterr().out
    assert "| none | ssjf |" in printed and "3 requests, arrival times as given" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    rows = rows_by_policy(report)
    assert rows["ssjf"]["mean_jct_s"] == pytest.approx(np.mean(FCFS_JCT))
    assert rows["ssjf"]["oracle_share"] == pytest.approx(0.0)
    assert rows["sjf-oracle"]["mean_jct_s"] == pytest.approx(np.mean(ORACLE_JCT))


def test_rows_without_a_prediction_use_the_predictor(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "w.jsonl",
        [
            {"arrival_s": 0.0, "true_tokens": 100, "predicted_tokens": 90},
            {"arrival_s": 0.001, "true_tokens": 30, "prompt": "a long question"},
            {"arrival_s": 0.002, "true_tokens": 10},
        ],
    )
    with pytest.raises(traffic.TrafficError, match=r"w\.jsonl:3: predicted_tokens: missing"):
        traffic.read_workload_file(path)  # --predictor real: row 3 has nothing to predict from
    work = traffic.to_workload(
        traffic.read_workload_file(path, need_prediction=False),
        predictor_spec="oracle",
        target_model="unused",
        rng=np.random.default_rng(0),
        predictor=None,
    )
    assert work.predicted.tolist() == [90.0, 30.0, 10.0]
    assert work.prediction_source == "given+oracle"


def test_rescaled_arrivals_keep_their_pattern_at_the_asked_load(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "w.jsonl",
        [{"arrival_s": a, "true_tokens": 50, "predicted_tokens": 50} for a in (1.0, 2.0, 5.0)],
    )
    as_given = run(config(workload=str(path)))
    rescaled = run(config(workload=str(path), rescale_arrivals=True, rho=0.5))
    assert as_given["cells"][0]["rate_rps"] == pytest.approx(2 / 4.0)
    cell = rescaled["cells"][0]
    assert cell["offered_rho"] == pytest.approx(0.5)
    # capacity: 1 / (50 tokens x 10 ms); at rho 0.5, 1 request/s; 2 gaps of 4 s -> 2 s.
    assert cell["rate_rps"] == pytest.approx(0.5 / (50 * STEP_S))


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        (
            "a.jsonl",
            '{"arrival_s": 0, "predicted_tokens": 3}\n',
            r"a\.jsonl:1: true_tokens: missing",
        ),
        (
            "b.jsonl",
            '{"arrival_s": 0, "true_tokens": 3, "predicted_tokens": 3}\n'
            '{"arrival_s": -1, "true_tokens": 3, "predicted_tokens": 3}\n',
            r"b\.jsonl:2: arrival_s: must be >= 0",
        ),
        (
            "c.jsonl",
            '{"arrival_s": 0, "true_tokens": 3, "predicted": 3}\n',
            r"c\.jsonl:1: predicted: unknown column",
        ),
        ("d.jsonl", '{"arrival_s": 0, "true_tokens": 2.5, "predicted_tokens": 1}\n', "integer"),
        ("e.jsonl", '{"arrival_s": 0, "true_tokens": 0, "prompt": "x"}\n', "must be >= 1"),
        ("f.jsonl", '\n{"arrival_s": "soon", "true_tokens": 3}\n', r"f\.jsonl:2: arrival_s"),
        ("g.jsonl", '{"arrival_s": 0, "true_tokens": 3\n', r"g\.jsonl:1: not JSON"),
        ("h.jsonl", "[0, 3, 3]\n", r"h\.jsonl:1: expected a JSON object"),
        ("i.csv", "arrival_s,true_tokens,latency\n0,3,1\n", r"i\.csv:1: latency: unknown column"),
        (
            "j.csv",
            "arrival_s,true_tokens,predicted_tokens\n0,3,1\n1,,4\n",
            r"j\.csv:3: true_tokens",
        ),
        ("k.csv", "arrival_s,true_tokens,predicted_tokens\n0,3,1,9\n", r"k\.csv:2: 4 fields"),
        ("l.csv", "arrival_s,true_tokens,predicted_tokens\n0,3,nan\n", "must be finite"),
        ("m.txt", "arrival_s,true_tokens\n", "name it .jsonl or .csv"),
        ("n.csv", "arrival_s,true_tokens,predicted_tokens\n", "no requests"),
    ],
)
def test_bad_files_are_refused_with_the_line_and_field(
    tmp_path: Path, name: str, text: str, error: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(traffic.TrafficError, match=error):
        traffic.read_workload_file(path)
    with pytest.raises(ValueError, match=error):  # and through the command's own path
        run(config(workload=str(path), predictor="real"))


def test_files_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"arrival_s": i, "true_tokens": 3, "predicted_tokens": 3} for i in range(3)]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    monkeypatch.setattr(traffic, "MAX_ROWS", 2)
    with pytest.raises(traffic.TrafficError, match="more than 2 requests"):
        traffic.read_workload_file(path)
    monkeypatch.setattr(traffic, "MAX_BYTES", 10)
    with pytest.raises(traffic.TrafficError, match="more than the limit of 10"):
        traffic.read_workload_file(path)


def outcome(arrival: float, tokens: int, predicted: float, reason: str, i: int) -> Outcome:
    """A row as the scheduler writes it: ``ts`` when it ended, ``completion_s`` its JCT."""
    jct = 3.0 + i  # whatever the live run took: only ts - completion_s matters here
    return Outcome(
        ts=1_700_000_000.0 + arrival + jct,
        request_id=f"r{i}",
        model="m",
        length_model="m",
        prompt=f"prompt {i}",
        predicted_tokens=predicted,
        actual_tokens=tokens,
        queue_wait_s=0.5,
        ttft_s=0.6,
        completion_s=jct,
        preemptions=0,
        finish_reason=reason,
        prediction_source="predictor",
    )


def test_from_log_replays_the_finished_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "outcomes.db"
    with OutcomeLog(path) as log:
        log.append(outcome(0.0, 100, GOOD[0], "stop", 0))
        log.append(outcome(0.0005, 7, 9.0, "cancelled", 1))
        log.append(outcome(0.001, 30, GOOD[1], "length", 2))
        log.append(outcome(0.0015, 7, 9.0, "error", 3))
        log.append(outcome(0.0016, 7, 9.0, "deadline", 4))
        log.append(outcome(0.002, 10, GOOD[2], "stop", 5))
    loaded = traffic.read_outcome_log(path)
    np.testing.assert_allclose(loaded.arrivals, ARRIVALS, atol=1e-6)
    assert loaded.true_tokens.tolist() == TRUE
    assert loaded.predicted.tolist() == GOOD
    assert loaded.skipped == {"cancelled": 1, "error": 1, "deadline": 1}
    assert loaded.prompts == ["prompt 0", "prompt 2", "prompt 5"]

    assert main(config(from_log=str(path), out=str(tmp_path / "r.json"))) == 0
    printed = capsys.readouterr().out
    assert "skipped: cancelled 1, deadline 1, error 1" in printed
    rows = rows_by_policy(json.loads((tmp_path / "r.json").read_text()))
    # The log's ts and completion_s are rounded through unix time: microseconds apart.
    assert rows["fcfs"]["mean_jct_s"] == pytest.approx(np.mean(FCFS_JCT), abs=1e-5)
    assert rows["sjf-oracle"]["mean_jct_s"] == pytest.approx(np.mean(ORACLE_JCT), abs=1e-5)
    assert rows["ssjf"]["oracle_share"] == pytest.approx(1.0, abs=1e-3)


def test_from_log_without_prompts_or_predictions(tmp_path: Path) -> None:
    """Digest mode keeps no text: a row the predictor failed on cannot be re-predicted."""
    path = tmp_path / "outcomes.db"
    with OutcomeLog(path, prompts="digest") as log:
        log.append(outcome(0.0, 100, GOOD[0], "stop", 0))
        log.append(outcome(0.001, 30, math.nan, "stop", 1))
    loaded = traffic.read_outcome_log(path)
    assert len(loaded) == 1 and loaded.skipped == {"no prediction": 1}
    assert loaded.prompts == [None]
    assert len(traffic.read_outcome_log(path, need_prediction=False)) == 2
    with pytest.raises(traffic.TrafficError, match="not a readable SQLite"):
        (tmp_path / "junk.db").write_text("not a database")
        traffic.read_outcome_log(tmp_path / "junk.db")


def test_one_source_at_a_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give one"):
        run(config(workload="a.jsonl", from_log="b.db"))
    with pytest.raises(ValueError, match="needs --workload or --from-log"):
        run(config(rescale_arrivals=True))


def test_the_command_names_a_bad_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shortline.cli import main as cli

    path = write_csv(tmp_path / "w.csv", "arrival_s,true_tokens", ["0,5", "1,"])
    assert cli(["simulate", "--workload", str(path), "--predictor", "oracle"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"shortline simulate: {path}:3: true_tokens: missing (required)"
