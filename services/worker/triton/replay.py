"""The ``replay`` model: replays output lengths, generates no text.

Every sequence emits exactly ``max_tokens`` tokens (``ignore_eos`` changes
nothing: there is no end-of-sequence to ignore), and every step of the shared
loop lasts ``a + b * batch_size`` milliseconds, the shape of a real GPU decode
step. Schedules can so be compared at production lengths and rates on two CPU
cores. The tokens read `` replay1 replay2 ...``; a resumed job (prompt plus the
text generated before) continues the numbering, so gaps and repeats show.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from services.worker.triton.engine import Sequence, sleep_until

# At most 18 digits: int() of a client's 5000-digit number would raise (Python's
# limit on digits) and fail the step of every sequence in the batch.
_LAST = re.compile(r" replay(\d{1,18})$")


@dataclass
class _ReplayState:
    next_index: int
    text: str = ""


class ReplayBackend:
    def __init__(self, step_a_ms: float, step_b_ms: float, max_batch: int = 256) -> None:
        self.step_a_s = step_a_ms / 1000.0
        self.step_b_s = step_b_ms / 1000.0
        self.max_batch = max_batch
        self._deadline = 0.0

    def step_seconds(self, batch_size: int) -> float:
        return self.step_a_s + self.step_b_s * batch_size

    def step(self, running: list[Sequence], joining: list[Sequence]) -> list[int]:
        for seq in joining:
            match = _LAST.search(seq.prompt)
            seq.state = _ReplayState(next_index=int(match.group(1)) + 1 if match else 1)
            # No tokenizer here: a prompt's words stand for its tokens (usage counts).
            seq.prompt_tokens = len(seq.prompt.split())
        # Anchored to the previous step's end while busy, so that the time spent
        # sending responses does not stretch the configured step.
        now = time.perf_counter()
        period = self.step_seconds(len(running) + len(joining))
        base = self._deadline if 0.0 <= now - self._deadline < period else now
        self._deadline = base + period
        sleep_until(self._deadline)
        tokens = []
        for seq in [*running, *joining]:
            state: _ReplayState = seq.state
            tokens.append(state.next_index)
            state.text += f" replay{state.next_index}"
            state.next_index += 1
        return tokens

    def leave(self, seqs: list[Sequence]) -> None:
        pass

    def text_of(self, seq: Sequence) -> str:
        state: _ReplayState = seq.state
        return state.text

    def is_eos(self, token: int) -> bool:
        return False
