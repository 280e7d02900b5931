"""The journal benchmark (``python -m bench.journal``) at its quick size, on real stacks.

Checks that the run measured what it claims to compare: both arms streamed every
token, the journaled scheduler committed (and without errors) while the other did
not commit at all, so a run where the flag failed to reach a scheduler (journal off,
or on, in both arms) fails here. Latency ratios are left to the benchmark's table:
on a shared two-core machine they are too noisy to assert.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.journal.__main__ import ARMS, QUICK, main

pytestmark = pytest.mark.slow


def test_quick_run_measures_both_arms_and_only_one_journals(tmp_path: Path) -> None:
    main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "journal.json").read_text())
    assert (tmp_path / "journal.png").stat().st_size > 0

    streams = QUICK["streams"] * QUICK["rounds"]
    for arm in ARMS:
        counts = report["arms"][arm]
        assert counts["streams"] == streams, arm
        assert counts["tokens"] == streams * QUICK["tokens"], arm
        assert counts["deltas"] > 0 and counts["gaps"] > 0, arm
    for row in report["client"]:
        assert row["on_ms"] > 0 and row["off_ms"] > 0, row

    on, off = report["server"]["on"], report["server"]["off"]
    assert on["commits"] > 0, "the journaled arm never committed: was its journal off?"
    assert on["delay"]["count"] > 0
    assert on["errors"] == 0
    assert off["commits"] == 0, "the unjournaled arm committed: was --journal off ignored?"
