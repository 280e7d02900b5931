"""A quick live benchmark against a real stack (Triton, predictor, scheduler, worker)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import assert_nothing_left, descendants, shm_regions

from shortline.benchmark.config import BenchConfig
from shortline.benchmark.runner import run
from shortline.benchmark.spread import main as spread_main


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_live_run_replays_exact_lengths_and_writes_reports(tmp_path: Path) -> None:
    cfg = BenchConfig(
        quick=True,
        requests=6,
        rho="0.9",
        policies="fcfs,ssjf",
        batching="continuous",
        sim_workers="",
        sensitivity_requests=300,
        out=str(tmp_path),
    )
    result = run(cfg, progress=False)
    live = result["live"]
    assert [r["policy"] for r in live] == ["fcfs", "ssjf"]
    for row in live:
        assert row["errors"] == 0, row["error_examples"]
        assert row["unfinished"] == 0
        # Every request streamed exactly its replayed length, and the result said so.
        assert row["exact_length"] == 6
    cal = result["calibration"]
    # The step is configured at 10 + 1.5 x batch ms; the measurement must find it.
    assert 0.008 < cal["a_s"] < 0.014 and 0.0008 < cal["b_s"] < 0.0025
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["live_vs_sim"]) == 2
    spread = saved["replay_spread"]
    assert spread["replays"] == 3 and len(spread["cells"]) == 2
    md = (tmp_path / "results.md").read_text()
    assert "## Live: latency" in md and "| continuous | 0.90 | ssjf |" in md
    assert "## How far one run can move" in md
    assert (tmp_path / "jct_cdf.png").is_file()
    # The same cells replayed with a perfect predictor, added to the finished run.
    assert spread_main([str(tmp_path / "results.json"), "--predictions=true", "--replays=2"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["replay_spread_true"]["predictions"] == "true"
    assert saved["replay_spread"] == spread  # the head's replays are left as they were
    assert "## The same replays with a perfect predictor" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_stops_the_stack_the_benchmark_started(tmp_path: Path) -> None:
    """Killing `shortline bench` mid-run leaves no process and no Triton shared memory."""
    argv = [
        sys.executable,
        "-m",
        "shortline.cli",
        "bench",
        "--quick",
        "--requests=200",
        "--policies=fcfs",
        "--batching=continuous",
        "--sim-workers=",
        f"--out={tmp_path}",
    ]
    shm_before = shm_regions()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "capacity" in line:  # the stack is up and the first cell is starting
            break
    assert any("capacity" in line for line in lines), "".join(lines)
    children = descendants(proc.pid)
    assert children, "the benchmark started no processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 130
    assert_nothing_left(children, shm_before)
