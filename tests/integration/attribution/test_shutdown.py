"""A graceful stop ends open WatchRewards feeds with UNAVAILABLE instead of waiting out the grace
period for streams that never end by themselves."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from openlora.v1 import attribution_pb2, attribution_pb2_grpc

from services.attribution.app import build
from services.common.grpc_client import open_channel
from tests.integration.attribution.wire import attribution_settings
from tests.kit.service_auth import trusted


async def test_stop_ends_watch_streams_promptly(ledger_url: str) -> None:
    built = build(attribution_settings(ledger_url, grace_period_s=30.0))
    try:
        await built.start()
        async with open_channel(f"127.0.0.1:{built.server.port}", **trusted("attribution")) as channel:
            watch = attribution_pb2_grpc.AttributionStub(channel).WatchRewards(
                attribution_pb2.WatchRewardsRequest()
            )
            await watch.initial_metadata()
            started = time.monotonic()
            stopping = built.server.stop()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await watch.read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.wait_for(stopping, timeout=5)
            assert time.monotonic() - started < 5
    finally:
        await built.close()
