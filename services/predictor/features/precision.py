"""Which float precision a torch forward runs in: one rule for every extractor."""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("bf16", "fp32")


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (else bf16 is emulated and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` is ``bf16`` where the CPU has it, else ``fp32``; else one of those two."""
    if precision == "auto":
        precision = "bf16" if bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision
