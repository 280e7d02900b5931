"""CPU time of each service's process tree, from ``/proc``.

A service is its ``shortline`` process and everything below it: Triton's
child is ``tritonserver``, whose children are the Python backend's stubs, and
all of that is the cost of producing tokens. Each process counts its own
``utime + stime`` and, for children it reaped (``cutime + cstime``), theirs:
a helper that came and went during the window is not lost. Only deltas over a
window mean anything; ticks are ``SC_CLK_TCK`` (10 ms), so a window must hold
seconds of CPU for the figures to be precise to a percent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own ticks, reaped children's ticks) of one process; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    # Field numbers of proc(5), minus 3: state is 3, ppid 4, utime 14 ... cstime 17.
    ppid = int(fields[1])
    own = int(fields[11]) + int(fields[12])
    reaped = int(fields[13]) + int(fields[14])
    return ppid, own, reaped


def _all() -> dict[int, tuple[int, int, int]]:
    out: dict[int, tuple[int, int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                out[int(entry.name)] = stat
    return out


def tree_seconds(roots: Iterable[int], table: Mapping[int, tuple[int, int, int]]) -> float:
    """CPU seconds of the processes ``roots`` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks = 0
    todo = [r for r in roots if r in table]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, own, reaped = table[pid]
        ticks += own + reaped
        todo.extend(children.get(pid, ()))
    return ticks * TICK_S


def own_seconds(pid: int) -> float:
    """CPU seconds of one process alone (not its children: the bench's own stack children
    are counted under their services)."""
    stat = _read_stat(pid)
    return 0.0 if stat is None else stat[1] * TICK_S


def snapshot(services: Mapping[str, Iterable[int]], client_pid: int) -> dict[str, float]:
    """CPU seconds so far per service (its roots' trees) and of the client process."""
    table = _all()
    out = {name: tree_seconds(roots, table) for name, roots in services.items()}
    out["client"] = own_seconds(client_pid)
    return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of one process's threads, summed by thread name (``comm``), the first
    thread as ``main`` (the event loop's, in a service); gRPC's and the journal's helper
    threads have names of their own."""
    out: dict[str, float] = {}
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return out
    for task in tasks:
        try:
            raw = Path(task.path, "stat").read_text()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) * TICK_S
        out[name] = out.get(name, 0.0) + seconds
    return out
