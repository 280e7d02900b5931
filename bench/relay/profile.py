"""Where the scheduler's CPU goes per relayed message: py-spy under the bench's load.

``--profile-scheduler [off|on]`` profiles that setting's scheduler during each
of its measured rounds, three ways, each a difference over the round:

- **threads**: CPU seconds of each of its threads from ``/proc`` (the event
  loop's thread, gRPC's poller and executor threads, the journal's
  checkpointer), exact and complete;
- **py-spy** ``record --gil --nonblocking``: samples of the thread holding the
  GIL only, without pausing the scheduler (its CPU figures stay its own). So
  the samples are the Python side of the work, mostly the event loop's thread;
  gRPC's Cython callbacks hold the GIL but make no Python frame, so their time
  shows as the asyncio frame that ran them (``Handle._run``);
- **journal**: commits and their summed time, from the scheduler's Prometheus
  histogram.

A message is a chunk the clients received (with coalescing off, one token):
one message to the client, and its share of a message of the worker's delta
stream, which carries several jobs' chunks (``Execute`` with a worker that
predates it: one message from the worker). A function's share of the
samples times the event loop thread's CPU per message is its cost per
message, in microseconds: the samples are wall time with the GIL held (a
thread the OS preempts while holding it still counts), so the shares are
normalised to the thread's measured CPU, not taken as CPU themselves.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.relay import procstat

RATE_HZ = 200
FOCUS = "services/scheduler/"
JOURNAL = "shortline_journal_commit_seconds"


def py_spy() -> str | None:
    """The py-spy beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def journal_counts(metrics_url: str) -> tuple[float, float]:
    """(commits, seconds in commits) so far, from the scheduler's /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == JOURNAL:
            for sample in family.samples:
                if sample.name == f"{JOURNAL}_count":
                    count += sample.value
                elif sample.name == f"{JOURNAL}_sum":
                    total += sample.value
    return count, total


class Profiler:
    """Accumulates the three views over the rounds it is started and stopped for."""

    def __init__(self, exe: str, folder: Path) -> None:
        self.exe = exe
        self.folder = folder
        self.files: list[Path] = []
        self.threads: dict[str, float] = {}
        self.commits = 0.0
        self.commit_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._url = ""
        self._threads: dict[str, float] = {}
        self._journal = (0.0, 0.0)

    def start(self, pid: int, metrics_url: str) -> None:
        self._pid, self._url = pid, metrics_url
        out = self.folder / f"spy-{len(self.files)}.txt"
        self.files.append(out)
        argv = [self.exe, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--gil"]
        argv += ["--nonblocking", "--nolineno", "--format", "raw", "--output", str(out)]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._threads = procstat.thread_seconds(pid)
        self._journal = journal_counts(metrics_url)

    def stop(self) -> None:
        after = procstat.thread_seconds(self._pid)
        for name, seconds in after.items():
            self.threads[name] = (
                self.threads.get(name, 0.0) + seconds - self._threads.get(name, 0.0)
            )
        commits, commit_s = journal_counts(self._url)
        self.commits += commits - self._journal[0]
        self.commit_s += commit_s - self._journal[1]
        proc, self._proc = self._proc, None
        assert proc is not None
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not self.files[-1].exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}")

    def analyse(self, cpu_s: float, messages: int, top: int = 25) -> dict[str, Any]:
        report = analyse(read_stacks(self.files), self.threads.get("main", 0.0), messages, top)
        per = 1e6 / max(messages, 1)
        report["cpu_s"] = cpu_s
        report["us_per_message"] = cpu_s * per
        report["threads_us_per_message"] = {
            k: v * per for k, v in sorted(self.threads.items(), key=lambda kv: -kv[1]) if v > 0
        }
        report["journal"] = {
            "commits": self.commits,
            "messages_per_commit": messages / self.commits if self.commits else 0.0,
            "us_per_commit": self.commit_s * 1e6 / self.commits if self.commits else 0.0,
            "us_per_message": self.commit_s * per,
        }
        return report


def read_stacks(paths: Iterable[Path]) -> Counter[tuple[str, ...]]:
    """Collapsed stacks (root first) and their sample counts, over several files."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            frames, _, count = line.rpartition(" ")
            if frames and count.isdigit():
                stacks[tuple(frames.split(";"))] += int(count)
    return stacks


def short(frame: str) -> str:
    """``func (/abs/path/services/x/y.py)`` -> ``services/x/y.py:func``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("services/", "shortline/", "site-packages/", "python3."):
        i = where.find(marker)
        if i >= 0:
            where = where[i:]
            break
    return f"{where}:{name}" if where else name


def analyse(
    stacks: Counter[tuple[str, ...]], gil_cpu_s: float, messages: int, top: int = 25
) -> dict[str, Any]:
    """Inclusive and self shares per function of the GIL samples, and microseconds per
    message (a share of ``gil_cpu_s``, the event loop thread's CPU)."""
    total = sum(stacks.values())
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, n in stacks.items():
        names = [short(f) for f in frames]
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    us_per_sample = gil_cpu_s * 1e6 / max(messages, 1) / max(total, 1)

    def rows(counter: Counter[str], keep: Any) -> list[dict[str, Any]]:
        chosen = [(k, v) for k, v in counter.most_common() if keep(k)][:top]
        return [
            {"function": k, "share": v / max(total, 1), "us_per_message": v * us_per_sample}
            for k, v in chosen
        ]

    return {
        "samples": total,
        # Samples over the loop thread's CPU time at the rate: near 1 when the GIL
        # holder is that thread whenever it runs.
        "coverage": total / (gil_cpu_s * RATE_HZ) if gil_cpu_s > 0 else 0.0,
        "gil_cpu_s": gil_cpu_s,
        "messages": messages,
        "scheduler_inclusive": rows(inclusive, lambda k: k.startswith(FOCUS)),
        "self_any": rows(own, lambda k: True),
        "inclusive_any": rows(inclusive, lambda k: True),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\nscheduler profile (coalescing {report['setting']}, {report['messages']} messages): "
        f"{report['us_per_message']:.1f} us CPU per message"
    )
    threads = report["threads_us_per_message"]
    print(
        "-- per thread (us per message): " + ", ".join(f"{k} {v:.1f}" for k, v in threads.items())
    )
    j = report["journal"]
    print(
        f"-- journal: {j['commits']:.0f} commits, {j['messages_per_commit']:.2f} messages per "
        f"commit, {j['us_per_commit']:.0f} us per commit, {j['us_per_message']:.1f} us per message"
    )
    print(
        f"-- py-spy --gil: {report['samples']} samples, {report['coverage']:.0%} of the loop "
        "thread's CPU"
    )
    for title, key in (
        ("inclusive, services/scheduler", "scheduler_inclusive"),
        ("self (leaf), any code", "self_any"),
        ("inclusive, any code", "inclusive_any"),
    ):
        print(f"-- {title}")
        for row in report[key]:
            print(f"{row['share']:>7.1%} {row['us_per_message']:>7.1f} us  {row['function']}")
