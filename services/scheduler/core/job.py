"""A request as the scheduler sees it, with its state machine in one place.

States mirror ``shortline.scheduler.v1.RequestState`` (same numbers). The
ready queue holds exactly the PREDICTED jobs: a preempted job passes through
PREEMPTED while its worker stops it, then returns to PREDICTED with its
remaining prediction (the design's "back to the queue").
"""

from __future__ import annotations

import enum
import math
from typing import Any

from shortline.common.length_distribution import LengthDistribution


class JobState(enum.IntEnum):
    # IntEnum (not Enum) so hashing and table lookups stay C-fast in the simulator.
    QUEUED = 1
    PREDICTED = 2
    RUNNING = 3
    PREEMPTED = 4
    DONE = 5
    CANCELLED = 6
    FAILED = 7


TERMINAL: frozenset[JobState] = frozenset({JobState.DONE, JobState.CANCELLED, JobState.FAILED})

_S = JobState
# Index = current state; value = states it may move to. The only place transitions are defined.
_ALLOWED: tuple[frozenset[JobState], ...] = (
    frozenset(),  # 0: unused
    frozenset({_S.PREDICTED, _S.CANCELLED, _S.FAILED}),  # QUEUED: awaiting a prediction
    frozenset({_S.RUNNING, _S.CANCELLED, _S.FAILED}),  # PREDICTED: in the ready queue
    frozenset({_S.DONE, _S.PREEMPTED, _S.CANCELLED, _S.FAILED}),  # RUNNING
    # PREEMPTED: its worker is stopping it; DONE when it finished before the stop landed.
    frozenset({_S.PREDICTED, _S.DONE, _S.CANCELLED, _S.FAILED}),
    frozenset(),  # DONE
    frozenset(),  # CANCELLED
    frozenset(),  # FAILED
)


class IllegalTransitionError(RuntimeError):
    """A job was asked to move to a state its lifecycle does not allow."""


class Job:
    """Mutable record of one request; owned by the core while it is live."""

    __slots__ = (
        "arrival",
        "attachment",
        "deadline",
        "embedding",
        "entry",
        "finish",
        "finish_reason",
        "first_dispatch",
        "first_token",
        "generated",
        "id",
        "length_dist",
        "length_model",
        "max_tokens",
        "model",
        "predicted",
        "prediction_source",
        "preemptions",
        "priority",
        "prompt",
        "prompt_tokens",
        "ready_since",
        "requeues",
        "run_start_generated",
        "run_started",
        "run_token",
        "seq",
        "state",
        "tenant",
        "true_tokens",
        "worker",
    )

    def __init__(
        self,
        job_id: Any,
        *,
        arrival: float,
        model: str = "",
        length_model: str = "",
        prompt: str = "",
        prompt_tokens: int = 0,
        max_tokens: int = 1 << 30,
        true_tokens: int | None = None,
        deadline: float | None = None,
        priority: int = 0,
        tenant: str = "",
    ) -> None:
        self.id = job_id
        self.arrival = arrival
        self.model = model
        self.length_model = length_model or model
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.true_tokens = true_tokens
        self.deadline = deadline
        # Strict band (higher = more urgent) and who sent it (fair share): both fixed while
        # the job lives, since the banded queue finds a queued job's band and tenant by them.
        self.priority = priority
        self.tenant = tenant
        self.state = JobState.QUEUED
        self.seq = 0
        self.predicted = math.nan
        self.prediction_source = ""
        # The predicted length as a distribution (LengthDistribution) when the predictor
        # sent quantiles; None when only a point is known (every policy then uses it).
        self.length_dist: LengthDistribution | None = None
        self.embedding: Any = None
        self.generated = 0  # tokens generated over all runs, as streamed to the client
        self.run_start_generated = 0  # ``generated`` when the current run started
        self.run_started = 0.0  # when the current run was dispatched
        self.run_token = 0  # bumps on every dispatch; stale running-heap entries carry old ones
        self.preemptions = 0  # by the policy; bounded by the preemption rule
        self.requeues = 0  # after a worker was lost; not bounded by the rule
        self.worker: Any = None
        self.ready_since = arrival
        self.first_dispatch: float | None = None
        self.first_token: float | None = None
        self.finish: float | None = None
        self.finish_reason = ""
        self.entry: list[Any] | None = None  # the ready-queue entry while queued
        # The driver's own record of this request (the service's stream state), opaque
        # to the core: the core's table of live jobs is the one registry of requests.
        self.attachment: Any = None

    def to(self, new: JobState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransitionError(
                f"job {self.id!r}: {self.state.name} -> {new.name} is not allowed"
            )
        self.state = new

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def __repr__(self) -> str:
        return (
            f"Job({self.id!r}, {self.state.name}, predicted={self.predicted:.1f}, "
            f"generated={self.generated})"
        )
