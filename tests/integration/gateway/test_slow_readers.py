"""A client that stops reading its stream: the gateway holds at most a context's worth of its tokens
(MAX_UNREAD_TOKENS) and then tells the worker to stop, instead of taking its chunks into memory for
as long as the worker generates (KV blocks held all along); the client, if it reads again, gets what
was held and then RESOURCE_EXHAUSTED."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from openlora.v1 import inference_pb2, inference_pb2_grpc

from services.gateway.worker_link import MAX_UNREAD_TOKENS
from tests.integration.gateway.kit import (
    GLOBEX_KEY,
    GatewayUnderTest,
    InProcessWorkers,
    auth,
    gateway_settings,
    generate_request,
)
from tests.kit.waits import wait_until


async def test_a_client_that_stops_reading_stops_the_workers_generation(tmp_path: Path) -> None:
    workers = await InProcessWorkers.start(1)  # chunks as fast as the relay takes them
    gateway = await GatewayUnderTest.start(gateway_settings(tmp_path, workers.addresses), wait_workers=1)
    try:
        # Without BDP probing, the stream's HTTP/2 window stays at 64 KiB: a few thousand chunks fill it.
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{gateway.port}", options=[("grpc.http2.bdp_probe", 0)]
        )
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = generate_request(max_new_tokens=2_000_000)
        call = stub.Generate(request, metadata=auth(GLOBEX_KEY), timeout=120)
        first = await call.read()
        assert isinstance(first, inference_pb2.GenerateChunk)
        # Not reading any more: the worker's stream must be stopped long before its two million.
        worker = workers.workers[0]
        await wait_until(lambda: worker.cancelled == 1, 60, "the worker's stream cancelled")
        received = len(first.token_ids)
        with pytest.raises(grpc.aio.AioRpcError) as stopped:
            while (chunk := await call.read()) is not grpc.aio.EOF:
                assert isinstance(chunk, inference_pb2.GenerateChunk)
                received += len(chunk.token_ids)
        assert stopped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waited for the client" in (stopped.value.details() or "")
        assert received < 2_000_000
        assert received >= MAX_UNREAD_TOKENS  # what was held reached the client first
        await channel.close()
    finally:
        await gateway.stop()
        await workers.stop()
