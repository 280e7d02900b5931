"""The load: many concurrent replay streams, timed at the client as a user sees them.

Each stream asks the ``replay`` model for exactly ``tokens`` tokens
(``ignore_eos``), so its text is known in advance and a coalesced stream can
be checked character for character against an uncoalesced one. Times are the
SDK's view (``AsyncGenerateStream``): time to first token from the call to
the first text, the inter-chunk delay between consecutive pieces of text of
one stream (a chunk is what one scheduler message delivered), and the round's
wall time from the first call to the last stream's end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from shortline.client import AsyncShortlineClient, ClientOptions

PROMPT = "Relay these tokens."
STREAM_TIMEOUT_S = 300.0


def replay_text(n: int) -> str:
    return "".join(f" replay{i}" for i in range(1, n + 1))


@dataclass
class Stream:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    chunks: int = 0
    tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass
class Round:
    wall_s: float
    streams: list[Stream]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)


async def _one(client: AsyncShortlineClient, tokens: int) -> Stream:
    out = Stream()
    started = time.perf_counter()
    last = started
    stream = client.generate(PROMPT, model="replay", max_tokens=tokens, ignore_eos=True)
    try:
        async for _ in stream:
            now = time.perf_counter()
            if out.ttft_s is None:
                out.ttft_s = now - started
            else:
                out.gaps_s.append(now - last)
            last = now
            out.chunks += 1
    except Exception as exc:  # the round reports it; the other streams go on
        out.error = repr(exc)[:200]
    out.text = stream.text
    if stream.result is not None:
        out.tokens = stream.result.actual_tokens
    return out


async def run_round(target: str, streams: int, tokens: int) -> Round:
    """``streams`` concurrent streams of ``tokens`` tokens each, through one channel (one
    client, as a service calling Shortline would hold)."""
    async with AsyncShortlineClient(
        ClientOptions(target=target, timeout_seconds=STREAM_TIMEOUT_S)
    ) as client:
        started = time.perf_counter()
        done = await asyncio.gather(*(_one(client, tokens) for _ in range(streams)))
        wall = time.perf_counter() - started
    return Round(wall, list(done))


def problems(rnd: Round, tokens: int) -> list[str]:
    """What makes a round's figures untrustworthy: failed streams, wrong text, short counts."""
    expected = replay_text(tokens)
    out: list[str] = []
    failed = [s.error for s in rnd.streams if s.error is not None]
    if failed:
        out.append(f"{len(failed)} streams failed, first: {failed[0]}")
    wrong = sum(1 for s in rnd.streams if s.error is None and s.text != expected)
    if wrong:
        out.append(f"{wrong} streams delivered text other than the replay of {tokens} tokens")
    short = sum(1 for s in rnd.streams if s.error is None and s.tokens != tokens)
    if short:
        out.append(f"{short} streams' results counted other than {tokens} tokens")
    return out
