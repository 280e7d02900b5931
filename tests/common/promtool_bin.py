"""Where promtool is, for the tests that run it: ``make setup`` puts the one from
Debian's ``prometheus`` package beside the venv's interpreter (the Makefile's
PROMTOOL); one on PATH also does. Locally a test without it is skipped; under CI
(``CI=true``) it fails, so CI never passes by skipping what it is meant to check."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def promtool() -> str:
    beside = Path(sys.executable).with_name("promtool")
    path = str(beside) if beside.exists() else shutil.which("promtool")
    if path is None:
        message = "promtool not found: `make setup` puts it in the venv (see the Makefile)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
