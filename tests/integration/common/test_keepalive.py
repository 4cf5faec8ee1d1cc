"""Keepalive policies agree on every hop: a stream that waits many keepalive intervals for its first
chunk survives, and so does one that pours data at a reader that sends none (whose flow-control pings
come far more often than any keepalive); a server that took either for abuse would answer GOAWAY
`too_many_pings` and drop the connection. (The server kit once passed its ping floor under a name
grpc ignores, keeping grpc's 5-minute default: an upload that waited 150 s for its turn was dropped
that way. These tests do not reproduce that in seconds; `test_server_options_name_the_ping_floor`
pins the option.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.integration.gateway.fake_worker import FakeWorker, fake_worker_server
from tests.integration.gateway.kit import (
    GatewayUnderTest,
    InProcessWorkers,
    gateway_settings,
    generate,
    generate_request,
)

# The server accepts a ping every 0.5 s; its clients ping every second.
FAST: dict[str, Any] = {"keepalive_time_s": 1.0, "keepalive_timeout_s": 0.5}


async def test_a_stream_quiet_for_many_pings_survives() -> None:
    """A client pinging every second (grpc's own floor between pings lowered to match) against a
    server whose policy allows it: a stream quiet for five pings, and one pouring 20,000 chunks at a
    reader that sends nothing, both survive."""
    worker = FakeWorker("w")
    server = fake_worker_server(worker, relay=False, **FAST)
    port = await server.start()
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 500),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", 1000),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            quiet = inference_pb2.GenerateRequest(
                text="wait:5", sampling=common_pb2.SamplingParams(max_new_tokens=2)
            )
            chunks = [c async for c in stub.Generate(quiet, timeout=30)]
            assert [len(c.token_ids) for c in chunks] == [1, 1, 0]
            busy = inference_pb2.GenerateRequest(
                text="pour", sampling=common_pb2.SamplingParams(max_new_tokens=20_000)
            )
            count = 0
            async for chunk in stub.Generate(busy, timeout=60):
                count += len(chunk.token_ids)
            assert count == 20_000
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


def test_server_options_name_the_ping_floor() -> None:
    """grpc reads a server's floor between a peer's pings from this name only (its C constant says
    MIN_RECV, the string does not); any other name is silently ignored."""
    from services.common.grpc_server import server_options
    from services.common.settings import ServiceSettings

    options = dict(server_options(ServiceSettings()))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert not any("min_recv_ping" in name for name in options)
