"""Placement: the free slot on the least-loaded worker, in O(max slots).

Workers with a free slot sit in buckets by how many slots they use; the
first non-empty bucket holds the least-loaded ones (ties: the one that has
been at that load longest). A full worker leaves the board, and so does a
worker that is present but not accepting work (its Triton down, draining):
its running jobs still give their slots back, but it is not picked again
until it accepts work again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class WorkerSlots:
    __slots__ = ("accepting", "alive", "attachment", "batch_left", "id", "jobs", "slots", "used")

    def __init__(self, worker_id: Any, slots: int, attachment: Any = None) -> None:
        self.id = worker_id
        self.attachment = attachment  # the driver's record of this worker (opaque here)
        self.slots = slots
        self.used = 0
        self.jobs: dict[Any, None] = {}  # job ids running here, insertion ordered
        self.alive = True
        self.accepting = True  # False: present, its jobs run on, but no new job goes here
        self.batch_left = 0  # dynamic batching: jobs of the current batch not yet finished


class SlotBoard:
    def __init__(self) -> None:
        self._levels: list[dict[Any, WorkerSlots]] = []
        self.free = 0  # free slots over all live workers

    def _ensure(self, level: int) -> None:
        while len(self._levels) <= level:
            self._levels.append({})

    def add(self, w: WorkerSlots) -> None:
        if not w.accepting:
            return
        self._ensure(w.slots)
        if w.used < w.slots:
            self._levels[w.used][w.id] = w
        self.free += w.slots - w.used

    def discard(self, w: WorkerSlots) -> None:
        if not w.accepting:
            return  # already off the board
        if w.used < w.slots:
            self._levels[w.used].pop(w.id, None)
        self.free -= w.slots - w.used

    def pick(self) -> WorkerSlots | None:
        """Least-loaded worker with a free slot."""
        for level in self._levels:
            if level:
                return next(iter(level.values()))
        return None

    def pick_first(self, ok: Callable[[WorkerSlots], bool]) -> WorkerSlots | None:
        """Least-loaded worker with a free slot that ``ok`` accepts (the band guard's
        placement when it refuses the least-loaded one): O(max slots + workers refused)."""
        for level in self._levels:
            for w in level.values():
                if ok(w):
                    return w
        return None

    def pick_idle(self) -> WorkerSlots | None:
        """A worker with every slot free (dynamic batching)."""
        if self._levels and self._levels[0]:
            return next(iter(self._levels[0].values()))
        return None

    def take(self, w: WorkerSlots, n: int = 1) -> None:
        levels = self._levels
        del levels[w.used][w.id]
        w.used += n
        if w.used < w.slots:
            levels[w.used][w.id] = w
        self.free -= n

    def give_back(self, w: WorkerSlots, n: int = 1) -> None:
        if not w.accepting:
            w.used -= n  # off the board: its slots count again once it accepts work
            return
        levels = self._levels
        if w.used < w.slots:
            del levels[w.used][w.id]
        w.used -= n
        levels[w.used][w.id] = w
        self.free += n

    def set_accepting(self, w: WorkerSlots, accepting: bool) -> bool:
        """Takes a present worker off the board or puts it back; True when that changed."""
        if w.accepting == accepting:
            return False
        if accepting:
            w.accepting = True
            self.add(w)
        else:
            self.discard(w)
            w.accepting = False
        return True
