"""The gateway's acceptance with three real `openlora worker serve` processes on the tiny model.

- the same adapter lands on the same worker while loads are balanced;
- one adapter hammered spills onto the other workers (bounded load);
- 200 concurrent streams finish without an error;
- a worker killed mid-run: requests without a chunk yet finish on another worker, streaming ones end
  UNAVAILABLE naming their request id; restarted, the worker is back in rotation.

Which worker served a request is read from the workers' own `/metrics` (requests they finished).
To hold requests on a worker before their first chunk, the victim is frozen with SIGSTOP first; its
TCP connections stay open, so the gateway keeps routing there until SIGKILL drops them.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, attribution_pb2

from services.adapter_store.app import build as build_store
from services.adapter_store.settings import StoreSettings
from services.cluster.synthetic_adapters import write_adapter
from services.common.grpc_client import open_channel
from services.gateway.routing import rendezvous_order
from services.inference.usage.spool import UsageSpool
from tests.integration.gateway.conftest import put_adapter
from tests.integration.gateway.kit import (
    ACME_KEY,
    GatewayUnderTest,
    auth,
    gateway_settings,
    generate,
    generate_request,
)
from tests.integration.worker.processes import ServiceProcess, worker_process
from tests.kit.ports import free_port, free_ports
from tests.kit.service_auth import trusted
from tests.kit.waits import wait_until, within

pytestmark = pytest.mark.slow

BASE = "tiny-llama"
ADAPTERS = [f"ad{i}" for i in range(6)]


@dataclass
class RealWorker:
    name: str
    process: ServiceProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    def finished(self) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return int(
            sum(float(v) for v in re.findall(r"^openlora_requests_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))
        )


@dataclass
class Cluster:
    workers: list[RealWorker]
    store_address: str
    make_worker: object

    def first_choice(self, adapter: str) -> RealWorker:
        address = rendezvous_order(adapter, [w.address for w in self.workers])[0]
        return next(w for w in self.workers if w.address == address)

    async def served_by(self, gateway: GatewayUnderTest, adapter: str, max_new_tokens: int = 4) -> str:
        before = [await asyncio.to_thread(w.finished) for w in self.workers]
        await generate(
            gateway.stub, generate_request("hello", adapter=adapter, max_new_tokens=max_new_tokens)
        )
        after = [await asyncio.to_thread(w.finished) for w in self.workers]
        (name,) = [w.name for w, b, a in zip(self.workers, before, after, strict=True) if a > b]
        return name


def start_worker(tmp_path: Path, model: Path, name: str, port: int, store_port: int) -> RealWorker:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    metrics_port = free_port()
    process = worker_process(
        folder,
        model,
        store_port=store_port,
        attribution_port=free_port(),  # none: usage waits in the spool, which this test does not read
        port=port,
        metrics_port=metrics_port,
        extra_env={"OPENLORA_WORKER_WORKER_ID": name, "OPENLORA_WORKER_GRACE_PERIOD_S": "1"},
    ).start()
    return RealWorker(name, process, metrics_port)


@pytest.fixture
async def cluster(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[Cluster]:
    settings = StoreSettings(port=0, backend="local", local_dir=tmp_path / "store", log_level="WARNING")
    store = build_store(settings)
    store_port = await store.start()
    async with open_channel(f"127.0.0.1:{store_port}", **trusted("store")) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        config_json = (tiny_llama_dir / "config.json").read_text()
        await stub.RegisterBaseModel(store_pb.RegisterBaseModelRequest(name=BASE, config_json=config_json))
        config = json.loads(config_json)
        for i, adapter in enumerate(ADAPTERS):
            folder = write_adapter(
                tmp_path / "adapters" / adapter, config, rank=4, targets=["q_proj", "v_proj"], seed=i
            )
            await put_adapter(stub, folder, adapter, owner="", public=True, base_model=BASE)
    workers = [
        start_worker(tmp_path, tiny_llama_dir, f"w{i}", port, store_port)
        for i, port in enumerate(free_ports(3))
    ]

    def restart(worker: RealWorker) -> RealWorker:
        return start_worker(tmp_path, tiny_llama_dir, worker.name, worker.process.port, store_port)

    started = Cluster(workers, f"127.0.0.1:{store_port}", restart)
    try:
        await asyncio.gather(*(w.process.wait_ready(timeout_s=240) for w in workers))
        yield started
    finally:
        for worker in started.workers:
            worker.process.terminate(timeout_s=10)
        await store.stop()


async def test_affinity_spill_failover_and_return_with_real_workers(tmp_path: Path, cluster: Cluster) -> None:
    addresses = [w.address for w in cluster.workers]
    gateway = await GatewayUnderTest.start(
        gateway_settings(
            tmp_path, addresses, store_address=cluster.store_address, max_concurrent_streams=256
        ),
        wait_workers=3,
    )
    try:
        # Affinity: one request at a time, so loads stay balanced.
        for adapter in ADAPTERS:
            for _ in range(2):
                assert await cluster.served_by(gateway, adapter) == cluster.first_choice(adapter).name

        # Bounded load: 9 concurrent long streams of one adapter spread over the workers.
        hot = ADAPTERS[0]
        before = [w.finished() for w in cluster.workers]
        await asyncio.gather(
            *(
                generate(gateway.stub, generate_request("hot", adapter=hot, max_new_tokens=64))
                for _ in range(9)
            )
        )
        grew = [w.name for w, b in zip(cluster.workers, before, strict=True) if w.finished() > b]
        assert len(grew) >= 2
        assert gateway.counter("openlora_gateway_routing_decisions_total", decision="spill") >= 1

        # 200 concurrent streams over every adapter and the base model: no errors, every token there.
        choices = [*ADAPTERS, None]
        results = await asyncio.gather(
            *(
                generate(
                    gateway.stub,
                    generate_request(f"load {i}", adapter=choices[i % len(choices)], max_new_tokens=8),
                    timeout=120,
                )
                for i in range(200)
            ),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert all(r.tokens == 8 for r in results if not isinstance(r, BaseException))
    finally:
        await gateway.stop()

    # Failover, through a gateway whose large load factor keeps every call on the adapter's first worker.
    (tmp_path / "failover").mkdir()
    gateway = await GatewayUnderTest.start(
        gateway_settings(
            tmp_path / "failover", addresses, store_address=cluster.store_address, load_factor=100
        ),
        wait_workers=3,
    )
    try:
        adapter = ADAPTERS[1]
        victim = cluster.first_choice(adapter)
        streamed: list[int] = []

        async def streaming() -> None:
            request = generate_request(
                "stream", adapter=adapter, max_new_tokens=3000, request_id="req-streaming"
            )
            async for chunk in gateway.stub.Generate(request, metadata=auth(ACME_KEY), timeout=120):
                streamed.extend(chunk.token_ids)

        stream = asyncio.create_task(streaming())
        await wait_until(lambda: len(streamed) > 0, 60, "the first streamed token")
        assert victim.process.process is not None
        victim.process.process.send_signal(signal.SIGSTOP)
        pending = [
            asyncio.create_task(
                generate(
                    gateway.stub, generate_request("pending", adapter=adapter, request_id=f"req-pending-{i}")
                )
            )
            for i in range(3)
        ]
        endpoint = gateway.gateway.pool.endpoints[victim.address]
        await wait_until(lambda: endpoint.in_flight == 4, 10, "the pending calls on the frozen victim")
        victim.process.kill()

        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stream
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "req-streaming" in (broken.value.details() or "")
        retried = await within(asyncio.gather(*pending), 60)
        assert all(r.tokens == 4 for r in retried)  # retried elsewhere, nothing lost
        assert gateway.counter("openlora_gateway_retries_total") >= 3

        await wait_until(lambda: not endpoint.healthy, 10, "the victim out of rotation")
        index = cluster.workers.index(victim)
        cluster.workers[index] = cluster.make_worker(victim)  # type: ignore[operator]
        await cluster.workers[index].process.wait_ready(timeout_s=240)
        await gateway.wait_healthy(3, timeout=60)
        assert await cluster.served_by(gateway, adapter) == victim.name
    finally:
        await gateway.stop()

    # The tenant the gateway stamped is on the workers' usage records (still in their spools, as no
    # attribution service runs here): the retried requests' completions were recorded by survivors.
    for worker in cluster.workers:
        worker.process.terminate(timeout_s=10)
    usage = [
        record
        for worker in cluster.workers
        for batch in UsageSpool(tmp_path / worker.name / "spool").pending()
        for record in batch.records
    ]
    assert usage and {r.tenant for r in usage} == {"acme"}
    completed = {r.client_request_id for r in usage if r.kind == attribution_pb2.COMPLETION}
    assert {f"req-pending-{i}" for i in range(3)} <= completed
