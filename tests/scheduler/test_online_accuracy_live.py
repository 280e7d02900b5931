"""The online accuracy of a live scheduler after real finished requests: the
gauges its /metrics serves (exported by the timer, without anyone asking), its
GetStats and ``shortline stats`` all carry the figures one computes from the
results the clients received (each result says its predicted and actual tokens).

No predictor here: every prediction is the fallback's running median, capped at
the request's max_tokens, so the predictions vary and their order is imperfect."""

from __future__ import annotations

import asyncio
import math
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from live_stack import stack, wait_for

from shortline.common.stats import kendall_tau
from shortline.scheduler.v1 import scheduler_pb2

LENGTHS = [9, 3, 12, 5, 7, 4, 11, 6, 10, 8]  # replay: exactly these many tokens


def sample(text: str, name: str, source: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'source="{source}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_accuracy_of_finished_requests_is_exported_and_shown(
    embedded_triton: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.scheduler import metrics
    from shortline.cli import main
    from shortline.common.net import free_port
    from shortline.common.prometheus import start_metrics_server

    async with stack(embedded_triton.grpc_url, tmp_path) as s:
        results = []
        for i, n in enumerate(LENGTHS):
            msgs, _ = await s.generate(f"acc-{i}", n)
            results.append(msgs[-1].result)
        predicted = [r.predicted_tokens for r in results]
        actual = [r.actual_tokens for r in results]
        assert actual == LENGTHS
        assert {r.prediction_source for r in results} == {scheduler_pb2.PREDICTION_SOURCE_FALLBACK}
        assert len(set(predicted)) > 2  # the running median moved
        tau = kendall_tau(predicted, actual)
        mae = sum(abs(p - a) for p, a in zip(predicted, actual, strict=True)) / len(actual)
        assert 0 < tau < 1

        port = free_port()
        endpoint = start_metrics_server(port, "127.0.0.1", metrics.REGISTRY)
        assert endpoint is not None
        try:

            def scrape() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body: bytes = r.read()
                return body.decode()

            # Exported by the scheduler's timer (every 5 s after a finish), unasked.
            text = ""

            def exported() -> bool:
                nonlocal text
                text = scrape()
                value = sample(text, "shortline_prediction_window_requests", "fallback")
                return value == len(LENGTHS)

            await wait_for(exported, timeout=15)
        finally:
            endpoint[0].shutdown()
        tau_metric = sample(text, "shortline_prediction_kendall_tau", "fallback")
        assert tau_metric == tau
        assert sample(text, "shortline_prediction_mae_tokens", "fallback") == pytest.approx(mae)
        bucket = sample(text, "shortline_prediction_bucket_accuracy_ratio", "fallback")
        assert bucket is not None and 0 <= bucket <= 1

        stats = await s.stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
        (group,) = stats.accuracy
        assert (group.source, group.head, group.requests, group.share) == (
            "fallback",
            "fallback",
            len(LENGTHS),
            1.0,
        )
        assert group.kendall_tau == tau and group.bucket_accuracy == bucket
        gain = sample(text, "shortline_prediction_order_gain_ratio", "fallback")
        assert gain is not None and -1 <= gain <= 1 and group.order_gain == gain
        assert math.isclose(group.mae_tokens, mae)

        code = await asyncio.to_thread(main, ["stats", "--scheduler", s.scheduler.address])
        assert code == 0
        out = capsys.readouterr().out
        row = next(line for line in out.splitlines() if " fallback " in line)
        assert row.split()[3:5] == [str(len(LENGTHS)), "100%"]
        assert f"{tau:.3f}" in row and f"{mae:.1f}" in row
