"""Routing and failover with fake workers as real processes (killed with SIGKILL, restarted).

- the same adapter lands on the same worker while loads are balanced, different adapters spread;
- one adapter hammered spills onto other workers (bounded load);
- a worker killed mid-run: requests without a chunk yet finish elsewhere, streaming ones end
  UNAVAILABLE naming their request id; restarted, the worker is back in rotation.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.gateway.routing import rendezvous_order
from tests.integration.gateway.kit import (
    ACME_KEY,
    FakeWorkerProcess,
    GatewayUnderTest,
    gateway_settings,
    generate,
    generate_request,
)
from tests.kit.ports import free_ports
from tests.kit.waits import wait_until, within


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[list[FakeWorkerProcess]]:
    started = [
        FakeWorkerProcess(f"w{i}", port, tmp_path / f"w{i}.log", delay_s=0.05)
        for i, port in enumerate(free_ports(3))
    ]
    await asyncio.gather(*(w.start() for w in started))
    yield started
    for worker in started:
        worker.kill()


def first_choice(adapter: str, workers: list[FakeWorkerProcess]) -> FakeWorkerProcess:
    address = rendezvous_order(adapter, [w.address for w in workers])[0]
    return next(w for w in workers if w.address == address)


async def test_adapters_stick_to_their_worker_and_a_hot_one_spills(
    tmp_path: Path, workers: list[FakeWorkerProcess]
) -> None:
    settings = gateway_settings(tmp_path, [w.address for w in workers])
    gateway = await GatewayUnderTest.start(settings, wait_workers=3)
    try:
        # Four adapters whose first choice is each worker, so every worker has some to keep.
        adapters = [
            name
            for worker in workers
            for name in [
                a for a in (f"adapter-{i}" for i in range(300)) if first_choice(a, workers) is worker
            ][:4]
        ]
        served: dict[str, set[str]] = {a: set() for a in adapters}
        for _ in range(3):  # one at a time: loads stay balanced, so affinity holds
            for adapter in adapters:
                result = await generate(gateway.stub, generate_request(adapter=adapter, max_new_tokens=1))
                served[adapter] |= result.served_by
        assert all(served[a] == {first_choice(a, workers).name} for a in adapters)
        assert gateway.counter("openlora_gateway_routing_decisions_total", decision="affinity") == 36

        # 12 concurrent streams of one adapter: ceil(1.25 x mean) caps its first worker, the rest spill.
        hot = "adapter-hot"
        results = await asyncio.gather(
            *(generate(gateway.stub, generate_request(adapter=hot, max_new_tokens=20)) for _ in range(12))
        )
        by_worker = Counter(next(iter(r.served_by)) for r in results)
        assert len(by_worker) >= 2
        assert by_worker[first_choice(hot, workers).name] == max(by_worker.values())
        assert max(by_worker.values()) <= 5  # ceil(1.25 x 12 / 3)
        assert gateway.counter("openlora_gateway_routing_decisions_total", decision="spill") >= 1
    finally:
        await gateway.stop()


async def test_a_killed_worker_fails_over_and_comes_back_after_restart(
    tmp_path: Path, workers: list[FakeWorkerProcess]
) -> None:
    # A large load factor keeps both requests on the adapter's first worker, the one to be killed.
    settings = gateway_settings(tmp_path, [w.address for w in workers], load_factor=100)
    gateway = await GatewayUnderTest.start(settings, wait_workers=3)
    try:
        adapter = "adapter-victim"
        victim = first_choice(adapter, workers)
        streaming_chunks: list[str] = []

        async def streaming() -> None:
            request = generate_request(adapter=adapter, max_new_tokens=400, request_id="req-streaming")
            call = gateway.stub.Generate(
                request, metadata=[("authorization", f"Bearer {ACME_KEY}")], timeout=60
            )
            async for chunk in call:
                streaming_chunks.append(chunk.text)

        stream = asyncio.create_task(streaming())
        await wait_until(lambda: len(streaming_chunks) >= 3, 10, "the stream to start")
        pending = asyncio.create_task(
            generate(gateway.stub, generate_request("wait:3", adapter=adapter, request_id="req-pending"))
        )
        await wait_until(lambda: victim_in_flight(gateway, victim) == 2, 10, "both calls on the victim")

        victim.kill()

        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stream
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "req-streaming" in (broken.value.details() or "")
        assert set(streaming_chunks) == {victim.name}

        # No chunk had reached the client: retried on the adapter's next worker, where it waits again.
        retried = await within(pending, 60)
        assert retried.served_by and victim.name not in retried.served_by
        assert gateway.counter("openlora_gateway_retries_total") >= 1
        assert gateway.counter("openlora_gateway_broken_streams_total") == 1

        await wait_until(lambda: not endpoint(gateway, victim).healthy, 10, "the victim out of rotation")
        during = await generate(gateway.stub, generate_request(adapter=adapter, max_new_tokens=1))
        assert victim.name not in during.served_by

        await victim.start()  # same port: the gateway's probes find it
        await gateway.wait_healthy(3, timeout=30)
        after = await generate(gateway.stub, generate_request(adapter=adapter, max_new_tokens=1))
        assert after.served_by == {victim.name}
    finally:
        await gateway.stop()


def endpoint(gateway: GatewayUnderTest, worker: FakeWorkerProcess):  # type: ignore[no-untyped-def]
    return gateway.gateway.pool.endpoints[worker.address]


def victim_in_flight(gateway: GatewayUnderTest, worker: FakeWorkerProcess) -> int:
    return int(endpoint(gateway, worker).in_flight)
