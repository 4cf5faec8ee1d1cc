"""Where workers come from and when the gateway says it is ready.

- a `dns:///name:port` worker set is resolved again every `dns_refresh_s`: workers that appear are
  added, workers that disappear are dropped;
- the gateway's health is SERVING only while at least one worker is in rotation.
"""

from __future__ import annotations

from pathlib import Path

from openlora.v1 import inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from services.gateway.app import GatewayApp
from tests.integration.gateway.fake_worker import FakeWorker, fake_worker_server
from tests.integration.gateway.kit import (
    GatewayUnderTest,
    InProcessWorkers,
    gateway_settings,
    generate,
    generate_request,
)
from tests.kit.ports import free_port
from tests.kit.waits import wait_until


async def test_a_dns_name_is_resolved_and_followed(tmp_path: Path) -> None:
    workers = await InProcessWorkers.start(3)
    ports = [int(a.rpartition(":")[2]) for a in workers.addresses]
    # One name, one port, as with a Kubernetes headless Service; here loopback addresses stand in for pods.
    answers: list[list[str]] = [[workers.addresses[0]]]

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("workers.test", 50052)
        return answers[-1]

    settings = gateway_settings(tmp_path, ["dns:///workers.test:50052"], dns_refresh_s=0.2)
    gateway = GatewayApp(settings)
    gateway.pool.resolve = resolve
    port = await gateway.start()
    try:
        await wait_until(lambda: len(gateway.pool.healthy_loads()) == 1, 10, "the first worker")
        answers.append(workers.addresses)
        await wait_until(lambda: len(gateway.pool.healthy_loads()) == 3, 10, "three workers")
        answers.append([f"127.0.0.1:{ports[2]}"])
        await wait_until(
            lambda: list(gateway.pool.endpoints) == [workers.addresses[2]], 10, "one worker left"
        )
        async with open_channel(f"127.0.0.1:{port}") as channel:
            result = await generate(
                inference_pb2_grpc.InferenceStub(channel), generate_request(adapter="any")
            )
        assert result.served_by == {"w2"}
    finally:
        await gateway.stop()
        await workers.stop()


async def test_the_real_resolver_finds_localhost(tmp_path: Path) -> None:
    workers = await InProcessWorkers.start(1)
    port = workers.addresses[0].rpartition(":")[2]
    settings = gateway_settings(tmp_path, [f"dns:///localhost:{port}"])
    gateway = await GatewayUnderTest.start(settings)
    try:
        await wait_until(
            lambda: f"127.0.0.1:{port}" in {w.address for w in gateway.gateway.pool.healthy_loads()}
        )
        assert (await generate(gateway.stub, generate_request())).served_by == {"w0"}
    finally:
        await gateway.stop()
        await workers.stop()


async def test_health_follows_the_workers(tmp_path: Path) -> None:
    port = free_port()
    gateway = await GatewayUnderTest.start(gateway_settings(tmp_path, [f"127.0.0.1:{port}"]))
    try:
        assert await health_status(gateway.channel) == "NOT_SERVING"
        server = fake_worker_server(FakeWorker("late"), port=port)
        await server.start()
        try:
            await gateway.wait_healthy(1, timeout=20)
            assert await health_status(gateway.channel) == "SERVING"
            assert await health_status(gateway.channel, "openlora.v1.Inference") == "SERVING"
        finally:
            await server.stop()
        # A draining worker reports NOT_SERVING through its health watch: out of rotation, no failed call.
        await gateway.wait_healthy(0, timeout=20)
        assert await health_status(gateway.channel) == "NOT_SERVING"
    finally:
        await gateway.stop()
