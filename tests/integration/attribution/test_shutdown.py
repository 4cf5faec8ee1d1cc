"""A graceful stop ends open WatchRewards feeds with UNAVAILABLE instead of waiting out the grace
period for streams that never end by themselves."""

from __future__ import annotations

import grpc
import pytest
from openlora.v1 import attribution_pb2, attribution_pb2_grpc

from services.attribution.app import build
from services.common.grpc_client import open_channel
from tests.integration.attribution.wire import attribution_settings
from tests.kit.service_auth import trusted
from tests.kit.waits import within
from tests.kit.work_clock import WorkClock


async def test_stop_ends_watch_streams_promptly(ledger_url: str) -> None:
    built = build(attribution_settings(ledger_url, grace_period_s=30.0))
    try:
        await built.start()
        async with open_channel(f"127.0.0.1:{built.server.port}", **trusted("attribution")) as channel:
            watch = attribution_pb2_grpc.AttributionStub(channel).WatchRewards(
                attribution_pb2.WatchRewardsRequest()
            )
            await watch.initial_metadata()
            started = WorkClock()
            stopping = built.server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await watch.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await within(stopping, timeout=5)
            assert started.elapsed() < 5
    finally:
        await built.close()


async def test_stop_ends_usage_streams_after_their_batch_and_keeps_what_was_acked(ledger_url: str) -> None:
    """A worker's usage stream stays open for its life: a draining attribution ends it (the worker
    resends what was not acked), instead of being SIGKILLed at the end of its grace period."""
    built = build(attribution_settings(ledger_url, grace_period_s=30.0))
    try:
        await built.start()
        async with open_channel(f"127.0.0.1:{built.server.port}", **trusted("attribution")) as channel:
            usage = attribution_pb2_grpc.AttributionStub(channel).StreamUsage()
            await usage.write(attribution_pb2.UsageBatch(sequence=1, worker_id="w", records=[record("r", 5)]))
            ack = await usage.read()
            assert isinstance(ack, attribution_pb2.RecordAck)
            assert (ack.acked_sequence, ack.inserted_records) == (1, 1)
            started = WorkClock()
            stopping = built.server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await usage.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "resend" in (caught.value.details() or "")
            await within(stopping, timeout=5)
            assert started.elapsed() < 5
    finally:
        await built.close()


def record(request_id: str, count: int) -> attribution_pb2.TokenUsage:
    made = attribution_pb2.TokenUsage(
        request_id=request_id,
        token_index=0,
        token_count=count,
        kind=attribution_pb2.COMPLETION,
        tenant="acme",
    )
    made.ts.GetCurrentTime()
    return made
