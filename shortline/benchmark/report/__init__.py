"""JSON, Markdown tables and PNG plots of a benchmark run, and the issue-7 targets check.

One module per concern: :mod:`.formatting` (how a number is written), :mod:`.targets`
(the issue-7 targets judged on the rows), :mod:`.tables` (one Markdown table each),
:mod:`.markdown` (``results.md``) and :mod:`.plots` (the PNGs); :func:`write` puts
them in a run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shortline.benchmark.report.markdown import markdown
from shortline.benchmark.report.plots import plot_cache, plot_cdf, plot_load, plot_noise
from shortline.benchmark.report.tables import spread_tables
from shortline.benchmark.report.targets import targets

__all__ = ["markdown", "spread_tables", "targets", "write"]


def write(result: dict[str, Any], cdfs: dict[str, dict[str, list[float]]], out: Path) -> list[Path]:
    """results.json, results.md and the PNGs in ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(result, indent=1, default=float))
    written[1].write_text(markdown(result) + "\n")
    for name, fn in (
        ("jct_cdf.png", lambda p: plot_cdf(result, cdfs, p)),
        ("jct_vs_load.png", lambda p: plot_load(result, p)),
        ("sensitivity_noise.png", lambda p: plot_noise(result, p)),
        ("sensitivity_cache.png", lambda p: plot_cache(result, p)),
    ):
        if fn(out / name):
            written.append(out / name)
    return written
