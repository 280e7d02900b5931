"""``shortline simulate --workload`` honours the priority and tenant columns (the same
core as the service) and reports mean and p99 JCT per band and per tenant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.scheduler.sim.runner import SimulateConfig, main


def test_bands_and_tenants_are_honoured_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One worker, one slot: a long job arrives first, then (while it runs) 20 low-band
    # jobs of 50 tokens and one high-band job of 200 tokens, the last to arrive.
    rows = [{"arrival_s": 0.0, "true_tokens": 100, "predicted_tokens": 100, "tenant": "a"}]
    rows += [
        {"arrival_s": 0.01 + i * 1e-4, "true_tokens": 50, "predicted_tokens": 50, "tenant": "a"}
        for i in range(20)
    ]
    rows.append(
        {
            "arrival_s": 0.5,
            "true_tokens": 200,
            "predicted_tokens": 200,
            "priority": 4,
            "tenant": "b",
        }
    )
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SimulateConfig(
        workers=1,
        slots=1,
        batching="none",
        policies="fcfs,ssjf",
        step_a_ms=9.0,
        step_b_ms=1.0,
        predictor="oracle",
        workload=str(path),
        out=str(tmp_path / "r.json"),
    )
    assert main(cfg) == 0
    assert "per priority band and tenant" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    groups = {(g["policy"], g["by"], str(g["group"])): g for g in report["groups"]}
    for policy in ("fcfs", "ssjf"):
        high = groups[(policy, "band", "4")]
        assert high["requests"] == 1
        # Served right after the first job (1 s of it left at 10 ms a token), then its
        # own 200 tokens: 0.5 s of waiting, 2 s of service, whatever its size or arrival.
        assert high["mean_jct_s"] == pytest.approx(0.5 + 2.0, abs=1e-6)
        assert groups[(policy, "band", "0")]["requests"] == 21
        assert groups[(policy, "tenant", "b")]["mean_jct_s"] == high["mean_jct_s"]
