"""The worker's K slots, without a server."""

from __future__ import annotations

import pytest

from services.worker.service.slots import DuplicateJob, Slots, SlotsFull


def test_slots_refuse_when_full_and_reuse_after_release() -> None:
    slots = Slots(2)
    a = slots.acquire("a", "m")
    slots.acquire("b", "m")
    with pytest.raises(SlotsFull):
        slots.acquire("c", "m")
    with pytest.raises(DuplicateJob):
        slots.acquire("a", "m")
    slots.release(a)
    assert slots.used == 1
    assert a.done.is_set()
    slots.acquire("c", "m")
