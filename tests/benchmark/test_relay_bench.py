"""The relay benchmark (``python -m bench.relay``) at its quick size, on real stacks.

Checks that both settings streamed every token (``main`` exits non-zero when a
stream's text or token count is wrong, so a coalescing that changes a
character fails here) and that each service's CPU was measured from
``/proc``. Ratios between the settings (CPU, latency) are left to the
benchmark's table: at the quick size, on a shared two-core machine, they are
too noisy to assert.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.relay.__main__ import QUICK, SERVICES, SETTINGS, main

pytestmark = pytest.mark.slow


def test_quick_run_measures_both_settings(tmp_path: Path) -> None:
    main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "relay.json").read_text())
    assert (tmp_path / "relay.png").stat().st_size > 0
    assert report["problems"] == []

    tokens = QUICK["streams"] * QUICK["tokens"] * QUICK["rounds"]
    for setting in SETTINGS:
        r = report["settings"][setting]
        assert r["tokens"] == tokens, setting
        assert r["tokens_per_s"] > 0, setting
        assert r["chunks"] > 0 and r["ttft_p50_ms"] > 0, setting
        for service in ("scheduler", "worker", "triton"):
            assert r[f"{service}_cpu_us_per_token"] > 0, (setting, service)
        assert set(SERVICES) <= {k.removesuffix("_cpu_us_per_token") for k in r}
    assert report["worker_args"]["off"] == "--coalesce-ms 0"


def test_transport_quick_run_reads_every_token_three_ways(tmp_path: Path) -> None:
    """``python -m bench.relay.transport``: each way of reading Triton's stream brought
    every token of every stream (it exits non-zero otherwise) and its CPU was measured."""
    from bench.relay import transport

    transport.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "relay_transport.json").read_text())
    assert (tmp_path / "relay_transport.png").stat().st_size > 0
    size = transport.QUICK
    assert [r["way"] for r in report["rows"]] == ["grpc-aio", "grpc-sync", "http-sse"]
    for row in report["rows"]:
        assert row["tokens"] == size["streams"] * size["tokens"], row
        assert row["responses"] >= row["tokens"] and row["cpu_us_per_response"] > 0, row
