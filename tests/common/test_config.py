"""The typed config: flag beats environment beats default."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from shortline.common.config import add_arguments, from_args


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    port: int = 50051
    ratio: float = 0.5
    name: str = "demo"
    verbose: bool = False


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig, "demo")
    return parser.parse_args(argv)


def test_defaults_when_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHORTLINE_DEMO_PORT", raising=False)
    assert from_args(DemoConfig, parse([]), "demo") == DemoConfig()


def test_environment_overrides_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORTLINE_DEMO_PORT", "6000")
    monkeypatch.setenv("SHORTLINE_DEMO_VERBOSE", "yes")
    cfg = from_args(DemoConfig, parse([]), "demo")
    assert cfg.port == 6000
    assert cfg.verbose is True


def test_flag_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORTLINE_DEMO_PORT", "6000")
    cfg = from_args(DemoConfig, parse(["--port", "7000", "--no-verbose"]), "demo")
    assert cfg.port == 7000
    assert cfg.verbose is False


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORTLINE_DEMO_RATIO", "fast")
    with pytest.raises(SystemExit, match="SHORTLINE_DEMO_RATIO"):
        from_args(DemoConfig, parse([]), "demo")
