"""Every scenario of the fault benchmark (``python -m bench.faults``) at its CI size.

Each runs against real processes on 127.0.0.1 (a supervised ``shortline up``, or
the in-process stack for ``fuzz``) and must meet the benchmark's goal: nothing
lost, hung, gapped, repeated or spliced, and none of the scenario's own problems.
The table and ``faults.json`` come from the benchmark itself; this only checks.
``fuzz`` runs at its quick size in ``tests/security/test_fuzz.py``, with its
per-RPC status checks.
"""

from __future__ import annotations

import pytest

from bench.faults.__main__ import SCENARIOS, missed

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "fuzz"])
def test_scenario_meets_its_goal_at_quick_size(name: str) -> None:
    result = SCENARIOS[name](True)
    assert result["name"] == name
    assert missed(result) == [], f"{name}: {result.get('figure')}"
