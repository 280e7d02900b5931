"""``shortline bench`` settings: what --quick fills in and what it leaves alone."""

from __future__ import annotations

from shortline.benchmark.config import BenchConfig


def test_full_mode_fills_every_load_and_mode() -> None:
    cfg = BenchConfig().effective()
    assert cfg.rhos() == [0.5, 0.7, 0.9, 1.1]
    assert cfg.modes() == ["none", "dynamic", "continuous"]
    assert cfg.requests == 1000


def test_quick_mode_shrinks_what_was_not_given() -> None:
    cfg = BenchConfig(quick=True).effective()
    assert cfg.rhos() == [0.9]
    assert cfg.modes() == ["none", "continuous"]
    assert cfg.requests == 40


def test_quick_mode_honours_an_explicit_list_even_when_it_equals_the_full_default() -> None:
    cfg = BenchConfig(quick=True, batching="none,dynamic,continuous", rho="0.5,0.9").effective()
    assert cfg.modes() == ["none", "dynamic", "continuous"]
    assert cfg.rhos() == [0.5, 0.9]
