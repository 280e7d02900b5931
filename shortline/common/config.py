"""One typed config per service, read from flags and environment variables.

Each service declares a dataclass; every field becomes a ``--flag`` and an
``SHORTLINE_<PREFIX>_<FIELD>`` variable. Precedence: flag, then environment,
then the dataclass default (which must run on a laptop).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(tp: Any) -> Any:
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp!r}")


def env_name(prefix: str, field: str) -> str:
    return f"SHORTLINE_{prefix.upper()}_{field.upper()}"


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any], prefix: str) -> None:
    """Adds one flag per field of the config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        tp = hints[field.name]
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        env = env_name(prefix, field.name)
        help_full = f"{help_text} (env {env}; default {default!r})"
        if tp is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_full,
            )
        else:
            parser.add_argument(
                flag, dest=field.name, type=_converter(tp), default=None, help=help_full
            )


def from_args(cls: type[T], args: argparse.Namespace | None, prefix: str) -> T:
    """Builds the config: flag value if given, else environment, else default."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, field.name, None) if args is not None else None
        if value is None:
            raw = os.environ.get(env_name(prefix, field.name))
            if raw is not None:
                try:
                    value = _converter(hints[field.name])(raw)
                except ValueError as exc:
                    raise SystemExit(
                        f"invalid {env_name(prefix, field.name)}={raw!r}: {exc}"
                    ) from exc
        if value is not None:
            values[field.name] = value
    try:
        return cls(**values)
    except ValueError as exc:  # a config's own check (``__post_init__``) names the flag
        raise SystemExit(f"invalid configuration: {exc}") from exc
