"""Online accuracy is kept per predictor head: a request the predictor answered is
counted under the head version the predictor named in its answer (not merely under
"predictor"), so two heads served side by side are told apart."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from in_process import three_services

from shortline.common.v1 import common_pb2
from shortline.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from shortline.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow

TARGET = "Meta-Llama-3-8B-Instruct"


async def test_requests_the_predictor_answered_are_grouped_by_its_head_version(
    embedded_triton: Any,
) -> None:
    async with three_services(embedded_triton.grpc_url, "heads") as s:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.predictor.cfg.port}") as channel:
            reply = await predictor_pb2_grpc.PredictorServiceStub(channel).Predict(
                predictor_pb2.PredictRequest(target_model=TARGET, prompts=["hello"]),
                timeout=30,
            )
        assert reply.head_version
        async with grpc.aio.insecure_channel(s.scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

            async def one(i: int) -> None:
                request = scheduler_pb2.GenerateRequest(
                    request_id=f"head-{i}",
                    model="replay",
                    prompt=f"Write {i + 1} sentences about the sea.",
                    max_tokens=3 + i,
                    sampling=common_pb2.SamplingParams(ignore_eos=True),
                    length_model=TARGET,
                )
                msgs = [m async for m in stub.Generate(request, timeout=60)]
                assert msgs[-1].result.prediction_source == (
                    scheduler_pb2.PREDICTION_SOURCE_PREDICTOR
                )

            await asyncio.gather(*(one(i) for i in range(6)))
            stats = await stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
    groups = [(g.source, g.head, g.requests) for g in stats.accuracy]
    assert groups == [("predictor", reply.head_version, 6)], groups
