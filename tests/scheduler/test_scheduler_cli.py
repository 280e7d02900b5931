"""``shortline scheduler serve`` refuses settings that cannot work before it binds a port."""

from __future__ import annotations

import argparse

import pytest

from services.scheduler import cli


def _serve(*flags: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["scheduler", "serve", *flags])
    return int(args.func(args))


def test_prediction_scale_is_for_replay_benchmarks_only() -> None:
    with pytest.raises(SystemExit, match="--prediction-scale is for replay benchmarks only"):
        _serve("--prediction-scale", "10")


def test_prediction_scale_must_be_positive() -> None:
    with pytest.raises(SystemExit, match=r"--prediction-scale must be > 0, got 0\.0"):
        _serve("--prediction-scale", "0", "--benchmark-mode")
