"""Hiding ../shared/data from a predictor while it loads: serving must need only the
shipped head artifacts (and the model packages), never the training data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def shared_data_hidden() -> Iterator[None]:
    saved = os.environ.get("SHORTLINE_DATA")
    os.environ["SHORTLINE_DATA"] = "/nonexistent/shortline-data"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SHORTLINE_DATA")
        else:
            os.environ["SHORTLINE_DATA"] = saved
