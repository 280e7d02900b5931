"""``python -m bench.serving``: ``shortline bench --quick``, results in bench/results/serving."""

from __future__ import annotations

from pathlib import Path

from shortline.benchmark.config import BenchConfig
from shortline.benchmark.runner import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "results" / "serving"
    raise SystemExit(main(BenchConfig(quick=True, out=str(out))))
