"""The replayed order gain of a live scheduler (services/scheduler/sim/replay.py run
by the service's accuracy timer, in a thread): after real requests queued behind one
slot, GetStats, the gauge and ``shortline stats`` report the figure the last replay
computed, on the deployment the scheduler really has (one worker, one slot).

No predictor here: every prediction is the fallback's, capped at the request's
max_tokens (the replay model's exact length), so requests sent before any finished
are predicted by their true length and the policy keeps most of the oracle's gain."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from live_stack import stack

from shortline.scheduler.v1 import scheduler_pb2

LENGTHS = [31, 4, 22, 9, 40, 2, 17, 12, 35, 6, 27, 3]


async def test_getstats_reports_the_replayed_gain_of_the_window(
    embedded_triton: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.scheduler import metrics
    from shortline.cli import main

    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        results = s.scheduler.plane.results
        results.replay_every_s = 1.0  # 60 s in service: a test waits for one round
        done = await asyncio.gather(*(s.generate(f"replay-{i}", n) for i, n in enumerate(LENGTHS)))
        assert sorted(m[-1].result.actual_tokens for m, _ in done) == sorted(LENGTHS)

        group = None
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
            (group,) = stats.accuracy
            last = results.last_replays
            # The round that saw the whole window has landed.
            if last and last[0].requests == len(LENGTHS) and not results.accuracy.unreplayed:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("no replay of the whole window within 30 s")
        assert group is not None and group.requests == len(LENGTHS)
        (replay,) = results.last_replays
        gain = group.replayed_order_gain
        assert gain == replay.gains[0] and not math.isnan(gain)
        assert replay.simulations == 3  # one group: fcfs, the oracle, the policy
        # Requests queued behind one slot: the oracle gains over fcfs, and predictions
        # equal to the truth keep most of it.
        assert replay.fcfs_mean_jct_s > 1.2 * replay.oracle_mean_jct_s
        assert 0.5 < gain <= 1.05
        assert replay.seconds < 1.0

        labels = {"model": group.length_model, "source": group.source, "head": group.head}
        exported = metrics.REGISTRY.get_sample_value(
            "shortline_prediction_replayed_order_gain_ratio", labels
        )
        assert exported == gain

        code = await asyncio.to_thread(main, ["stats", "--scheduler", s.scheduler.address])
        assert code == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if line.startswith("length model"))
        row = next(line for line in out.splitlines() if " fallback " in line)
        assert header.split()[-1] == "replay" and row.split()[-1] == f"{gain:.0%}"
