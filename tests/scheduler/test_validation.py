"""Request ids that reach log lines cannot carry control characters."""

from __future__ import annotations

import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service.validation import validate
from shortline.common.limits import ModelLimits
from shortline.scheduler.v1 import scheduler_pb2


@pytest.mark.parametrize("rid", ["a\nWARNING forged line", "tab\there", "bell\x07", "nul\x00"])
def test_a_request_id_with_control_characters_is_refused(rid: str) -> None:
    request = scheduler_pb2.GenerateRequest(
        request_id=rid, model="replay", prompt="hi", max_tokens=4
    )
    problem = validate(request, SchedulerConfig(), ModelLimits(model="replay"))
    assert problem is not None and "request_id must be printable" in problem


def test_a_printable_unicode_request_id_is_accepted() -> None:
    request = scheduler_pb2.GenerateRequest(
        request_id="ünïcode-id 42/ok", model="replay", prompt="hi", max_tokens=4
    )
    assert validate(request, SchedulerConfig(), ModelLimits(model="replay")) is None
