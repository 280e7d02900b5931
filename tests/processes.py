"""Process-tree checks shared by the tests that stop a launcher with a signal."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from ``ps``."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def shm_regions() -> set[Path]:
    return set(Path("/dev/shm").iterdir())


def assert_nothing_left(children: list[int], shm_before: set[Path]) -> None:
    """After a launcher stopped: none of its processes and no new Triton shared memory.

    Triton's Python stubs name their regions ``shortline<pid>x...`` after the
    process that started Triton (see services/worker/triton/embedded.py).
    """
    time.sleep(0.5)
    left = [pid for pid in children if alive(pid)]
    assert not left, f"processes left behind: {left}"
    # Only this launcher's: other tests on the machine may hold regions of their own.
    ours = tuple(f"shortline{pid}x" for pid in children)
    leaked = sorted(str(p) for p in shm_regions() - shm_before if p.name.startswith(ours))
    assert not leaked, f"shared memory left behind: {leaked}"
