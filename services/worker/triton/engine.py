"""One decoding loop shared by every active sequence of a model (continuous batching).

Triton hands requests to the model as they arrive; each becomes a
:class:`Sequence` in the engine's inbox. A single thread runs steps: at the
start of each step it drops cancelled and finished sequences and lets waiting
ones join (a joining sequence is prefilled in that same step), then asks the
backend for one token per sequence. So a new request starts at the next step,
a finished one leaves at once, and a cancellation takes effect within a step.
The engine knows nothing about Triton: it reports through each sequence's
``emit`` callback, which keeps it testable without a server.

One request never fails another: a backend that cannot serve one sequence
(its prompt failed to prefill) marks it (``Sequence.error``) and the engine
ends that one alone; a callback that raises (its client went away) ends only
its own sequence. Only a step that raises fails its whole batch.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.worker.sampling import SamplingParams

log = logging.getLogger(__name__)

# Finish reasons, spelled as vLLM spells them.
STOP = "stop"
LENGTH = "length"
ABORT = "abort"


@dataclass(frozen=True)
class Emission:
    """What one step produced for one sequence."""

    text: str
    tokens: int
    total_tokens: int
    step: int
    batch_size: int
    finish_reason: str | None = None
    error: str | None = None
    # Tokens of the prompt as the model counted them (0 until the backend has read it).
    prompt_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str
    params: SamplingParams
    emit: Callable[[Emission], None]
    is_cancelled: Callable[[], bool] = lambda: False
    token_ids: list[int] = field(default_factory=list)
    sent_text: str = ""
    finished: bool = False
    # Backend-specific decoding state (KV cache row, RNG, ...).
    state: Any = None
    # Set by the backend when it cannot serve this sequence (its token is then unused).
    error: str | None = None
    # Set by the backend when the sequence joins: the prompt's tokens (OpenAI's usage).
    prompt_tokens: int = 0


class StepBackend(Protocol):
    """A model that produces one token per sequence per step."""

    max_batch: int

    def step(self, running: list[Sequence], joining: list[Sequence]) -> list[int]:
        """One token for each of ``running + joining``, in order; joining ones get prefilled.

        A joining sequence that cannot be prefilled gets ``error`` set (and any token)
        instead of failing the step; it is not part of the backend's batch after."""
        ...

    def leave(self, seqs: list[Sequence]) -> None:
        """Forgets sequences that finished or were cancelled."""
        ...

    def text_of(self, seq: Sequence) -> str:
        """All text generated so far by ``seq`` (its ``token_ids`` decoded)."""
        ...

    def is_eos(self, token: int) -> bool: ...


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not safe to send yet (an incomplete
    UTF-8 character, or a possible start of a stop string)."""
    hold = 0
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class BatchEngine:
    """Runs :class:`StepBackend` steps in one thread for all submitted sequences."""

    def __init__(self, backend: StepBackend, name: str = "engine") -> None:
        self._backend = backend
        self._inbox: queue.Queue[Sequence | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.step_count = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        if self._stopping.is_set():  # no loop left to answer it
            self._fail(seq, "model is unloading", self.step_count, 0)
            return
        self._inbox.put(seq)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _finish(
        self, seq: Sequence, reason: str, text: str, tokens: int, step: int, bs: int
    ) -> None:
        seq.finished = True
        seq.sent_text += text
        seq.emit(
            Emission(
                text,
                tokens,
                len(seq.token_ids),
                step,
                bs,
                finish_reason=reason,
                prompt_tokens=seq.prompt_tokens,
            )
        )

    @staticmethod
    def _fail(seq: Sequence, error: str, step: int, bs: int) -> None:
        """Ends ``seq`` with an error; a callback that raises ends nothing else."""
        seq.finished = True
        try:
            seq.emit(Emission("", 0, len(seq.token_ids), step, bs, error=error))
        except Exception:
            log.exception("emit failed for %s", seq.request_id)

    def _advance(self, seq: Sequence, token: int, step: int, bs: int) -> None:
        params = seq.params
        if not params.ignore_eos and self._backend.is_eos(token):
            full = self._backend.text_of(seq)
            rest = full[len(seq.sent_text) :] if full.startswith(seq.sent_text) else ""
            self._finish(seq, STOP, rest, 0, step, bs)
            return
        seq.token_ids.append(token)
        full = self._backend.text_of(seq)
        cut = -1
        for stop in params.stop:
            at = full.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0 and not params.ignore_eos:
            text = full[: max(cut, len(seq.sent_text))]
            self._finish(seq, STOP, text[len(seq.sent_text) :], 1, step, bs)
            return
        if len(seq.token_ids) >= params.max_tokens:
            rest = full[len(seq.sent_text) :] if full.startswith(seq.sent_text) else ""
            self._finish(seq, LENGTH, rest, 1, step, bs)
            return
        safe = full[: len(full) - _held_back(full, params.stop)]
        delta = safe[len(seq.sent_text) :] if safe.startswith(seq.sent_text) else ""
        seq.sent_text += delta
        seq.emit(Emission(delta, 1, len(seq.token_ids), step, bs, prompt_tokens=seq.prompt_tokens))

    def _run(self) -> None:
        running: list[Sequence] = []
        waiting: collections.deque[Sequence] = collections.deque()
        while not self._stopping.is_set():
            idle = not running and not waiting
            try:
                item = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
                while True:
                    if item is not None:
                        waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self._stopping.is_set():
                break
            for seq in [*running, *waiting]:
                try:
                    if not seq.finished and seq.is_cancelled():
                        self._finish(seq, ABORT, "", 0, self.step_count, len(running))
                except Exception:  # its response sender is gone: it is over anyway
                    log.exception("cancel check failed for %s", seq.request_id)
                    seq.finished = True
            gone = [s for s in running if s.finished]
            if gone:
                self._backend.leave(gone)
                running = [s for s in running if not s.finished]
            waiting = collections.deque(s for s in waiting if not s.finished)
            joining: list[Sequence] = []
            while waiting and len(running) + len(joining) < self._backend.max_batch:
                joining.append(waiting.popleft())
            if not running and not joining:
                continue
            try:
                tokens = self._backend.step(running, joining)
            except Exception as exc:  # a failed step fails its batch, not the server
                log.exception("step failed")
                batch = running + joining
                self._backend.leave(batch)
                for seq in batch:
                    self._fail(seq, str(exc), self.step_count, len(batch))
                running = []
                continue
            self.step_count += 1
            running = running + joining
            bs = len(running)
            for seq, token in zip(running, tokens, strict=True):
                if seq.error is not None:
                    self._fail(seq, seq.error, self.step_count, bs)
                    continue
                try:
                    self._advance(seq, token, self.step_count, bs)
                except Exception:  # e.g. the response sender went away
                    log.exception("emit failed for %s", seq.request_id)
                    seq.finished = True
        while True:  # submitted while the loop was stopping
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                waiting.append(item)
        for seq in [*running, *waiting]:
            if not seq.finished:
                self._fail(seq, "model is unloading", self.step_count, 0)


def sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
