"""Keepalive policies agree on every hop: a stream that waits many keepalive intervals for its first
chunk survives, and so does one that pours data at a reader that sends none (whose flow-control pings
come far more often than any keepalive); a server that took either for abuse would answer GOAWAY
`too_many_pings` and drop the connection."""

from __future__ import annotations

from pathlib import Path

from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.grpc_client import open_channel
from services.common.settings import ServiceSettings
from tests.integration.gateway.fake_worker import FakeWorker, fake_worker_server
from tests.integration.gateway.kit import (
    GatewayUnderTest,
    InProcessWorkers,
    gateway_settings,
    generate,
    generate_request,
)

# Pings every 0.2 s: a 2-second wait is ten keepalive intervals.
FAST = {"keepalive_time_s": 0.2, "keepalive_timeout_s": 0.1}


async def test_an_idle_stream_and_a_busy_one_survive_many_keepalive_intervals() -> None:
    worker = FakeWorker("w")
    server = fake_worker_server(worker, relay=False)  # the default policy, 30 s pings
    port = await server.start()
    try:
        settings = ServiceSettings.model_construct(**ServiceSettings().model_dump() | FAST)
        async with open_channel(f"127.0.0.1:{port}", settings) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            idle = inference_pb2.GenerateRequest(
                text="wait:2", sampling=common_pb2.SamplingParams(max_new_tokens=2)
            )
            chunks = [c async for c in stub.Generate(idle, timeout=30)]
            assert [len(c.token_ids) for c in chunks] == [1, 1, 0]
            busy = inference_pb2.GenerateRequest(
                text="pour", sampling=common_pb2.SamplingParams(max_new_tokens=20_000)
            )
            count = 0
            async for chunk in stub.Generate(busy, timeout=60):
                count += len(chunk.token_ids)
            assert count == 20_000
            # The connection that carried both is still the one in use: nothing was dropped.
            again = [c async for c in stub.Generate(idle, timeout=30)]
            assert len(again) == 3
    finally:
        await server.stop(0)


async def test_the_gateways_relay_survives_idle_and_busy_streams_under_fast_pings(tmp_path: Path) -> None:
    """The gateway pinging its worker every 0.2 s (its relay call idle between streams, or busy
    pouring one stream's chunks at it) against a worker on the default policy."""
    workers = await InProcessWorkers.start(1)
    gateway = await GatewayUnderTest.start(
        gateway_settings(tmp_path, workers.addresses, **FAST), wait_workers=1
    )
    try:
        idle = await generate(gateway.stub, generate_request("wait:2", max_new_tokens=2))
        assert idle.tokens == 2
        busy = await generate(gateway.stub, generate_request("pour", max_new_tokens=5_000))
        assert busy.tokens == 5_000
        assert workers.workers[0].cancelled == 0
        assert gateway.counter("openlora_gateway_broken_streams_total") == 0
    finally:
        await gateway.stop()
        await workers.stop()
