"""A client application written against the v0.1.0 SDK, run by the version-skew test
with one release's SDK or another's on ``sys.path``.

Only what v0.1.0's ``shortline.client`` offers is used, so run with the current SDK
it also checks that code written for the previous release still runs unchanged.
It prints one JSON object: where ``shortline`` came from, a whole ``replay``
generation, one cancelled after its first text, and a long one preempted by a
short one (under a scheduler with a ``+preempt`` policy and one slot per worker):
each with its result and text.

Usage: ``python sdk_client.py SCHEDULER_ADDRESS NAME TOKENS``
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import shortline
from shortline.client import ClientOptions, GenerateStream, ShortlineClient

# Longer than the test lets it run: it is cancelled after its first text.
CANCELLED_MAX_TOKENS = 5000
# Prompts whose predicted lengths differ by far more than the preemption factor
# (every shipped head: 3.5x to 40x), so the short one preempts the long one.
LONG_PROMPT = (
    "Write a detailed essay of at least 2000 words on the history of the Roman Empire, "
    "covering every emperor, with sources."
)
SHORT_PROMPT = "Answer with one word: is water wet?"
PREEMPTED_TOKENS = 150
PREEMPTING_TOKENS = 8


def outcome(stream: GenerateStream, text: str, **extra: Any) -> dict[str, Any]:
    result, accepted = stream.result, stream.accepted
    return {
        "text": text,
        "result": None if result is None else dataclasses.asdict(result),
        "accepted": None if accepted is None else dataclasses.asdict(accepted),
        **extra,
    }


def main(target: str, name: str, tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {"shortline_file": shortline.__file__}
    options = ClientOptions(target=target, timeout_seconds=60.0)
    with ShortlineClient(options) as client:
        whole = client.generate(
            f"{name}: a whole generation",
            model="replay",
            max_tokens=tokens,
            ignore_eos=True,
            request_id=f"{name}-whole",
        )
        out["whole"] = outcome(whole, "".join(whole))

        cancelled = client.generate(
            f"{name}: cancelled once it runs",
            model="replay",
            max_tokens=CANCELLED_MAX_TOKENS,
            ignore_eos=True,
            request_id=f"{name}-cancelled",
        )
        chunks = iter(cancelled)
        first = next(chunks)
        state = cancelled.cancel()
        out["cancelled"] = outcome(cancelled, first + "".join(chunks), state=state)

        preempted = client.generate(
            LONG_PROMPT,
            model="replay",
            max_tokens=PREEMPTED_TOKENS,
            ignore_eos=True,
            request_id=f"{name}-preempted",
        )
        chunks = iter(preempted)
        first = next(chunks)  # running: the short one now waits for its slot
        preempting = client.generate(
            SHORT_PROMPT,
            model="replay",
            max_tokens=PREEMPTING_TOKENS,
            ignore_eos=True,
            request_id=f"{name}-preempting",
        )
        out["preempting"] = outcome(preempting, "".join(preempting))
        out["preempted"] = outcome(preempted, first + "".join(chunks))
    return out


if __name__ == "__main__":
    address, client_name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps(main(address, client_name, count)))
