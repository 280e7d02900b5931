"""The gateway tests reuse the scheduler tests' live stack (``live_stack``)."""

from __future__ import annotations

import sys
from pathlib import Path

_SCHEDULER_TESTS = str(Path(__file__).resolve().parents[1] / "scheduler")
if _SCHEDULER_TESTS not in sys.path:
    sys.path.insert(0, _SCHEDULER_TESTS)
