"""How the report writes one number: fixed digits, percentages, ranges; "-" for missing or NaN."""

from __future__ import annotations

import math
import statistics
from typing import Any


def fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.0f}%"


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def value_range(xs: list[float], digits: int) -> str:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    median = fmt(statistics.median(v), digits)
    return f"{fmt(min(v), digits)}-{fmt(max(v), digits)} (median {median})"
