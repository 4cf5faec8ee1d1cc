"""The worker's acceptance, with real processes: `openlora worker serve`, the adapter store on
SeaweedFS, attribution on PostgreSQL.

- 32 concurrent streams over 20 adapters equal the engine's own output, and the ledger holds exactly
  each request's prompt and completion tokens;
- attribution killed for 30 s under load, then restarted: the ledger ends equal to the tokens
  streamed, nothing lost, nothing doubled;
- the worker SIGKILLed with usage still in its spool, then restarted: the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.grpc_client import open_channel
from services.common.proto import adapter_store_pb2 as store_pb
from services.common.proto import adapter_store_pb2_grpc, attribution_pb2, inference_pb2_grpc
from services.inference.adapter_cache import AdapterCache, CacheConfig, LoadedAdapter
from tests.integration.inference.cache_kit import BASE, small_adapter
from tests.integration.worker.kit import (
    Streamed,
    collect,
    ledger_counts,
    reference_outputs,
    request,
    wait_until,
)
from tests.integration.worker.processes import (
    ServiceProcess,
    attribution_process,
    store_process,
    worker_process,
)
from tests.kit.postgres import create_database, drop_database
from tests.kit.seaweedfs import S3Endpoint

pytestmark = pytest.mark.slow

NUM_ADAPTERS = 20
PROMPT, COMPLETION = attribution_pb2.PROMPT, attribution_pb2.COMPLETION
OUTAGE_S = 30.0


@dataclass
class Plan:
    request_id: str
    prompt: list[int]
    adapter: str | None  # adapter id, or None for the base model
    max_new_tokens: int


@dataclass
class Cluster:
    tmp_path: Path
    model: Path
    database_url: str
    store: ServiceProcess
    attribution: ServiceProcess
    worker: ServiceProcess
    adapter_ids: list[str]

    def restart_attribution(self) -> ServiceProcess:
        self.attribution = attribution_process(
            self.tmp_path, self.database_url, self.attribution.port
        ).start()
        return self.attribution

    def restart_worker(self) -> ServiceProcess:
        self.worker = worker_process(
            self.tmp_path,
            self.model,
            store_port=self.store.port,
            attribution_port=self.attribution.port,
            port=self.worker.port,
        ).start()
        return self.worker


@pytest.fixture
def database_url() -> Iterator[str]:
    url = create_database("openlora_worker")
    yield url
    drop_database(url)


async def _upload_adapters(tmp_path: Path, model: Path, store_port: int) -> list[str]:
    async with open_channel(f"127.0.0.1:{store_port}") as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        config_json = (model / "config.json").read_text()
        await stub.RegisterBaseModel(store_pb.RegisterBaseModelRequest(name=BASE, config_json=config_json))
        from services.adapter_store.client import adapter_files, upload

        ids = []
        for i in range(NUM_ADAPTERS):
            folder = small_adapter(
                model, tmp_path / "adapters" / f"ad{i}", seed=100 + i, rank=4 + 4 * (i % 3)
            )
            header = store_pb.UploadHeader(id=f"ad{i}", owner="acme", base_model=BASE)
            ids.append((await upload(stub, header, adapter_files(folder))).id)
        return ids


@pytest.fixture
async def cluster(
    tmp_path: Path, tiny_llama_dir: Path, s3_server: S3Endpoint, database_url: str
) -> AsyncIterator[Cluster]:
    store = store_process(tmp_path, s3_server).start()
    attribution = attribution_process(tmp_path, database_url).start()
    started = [store, attribution]
    try:
        await asyncio.gather(store.wait_ready(), attribution.wait_ready())
        adapter_ids = await _upload_adapters(tmp_path, tiny_llama_dir, store.port)
        worker = worker_process(
            tmp_path, tiny_llama_dir, store_port=store.port, attribution_port=attribution.port
        ).start()
        started.append(worker)
        cluster = Cluster(tmp_path, tiny_llama_dir, database_url, store, attribution, worker, adapter_ids)
        await worker.wait_ready()
        yield cluster
        # Restarted processes are new objects: stop those too.
        started += [p for p in (cluster.worker, cluster.attribution) if p not in started]
    finally:
        for process in reversed(started):
            process.terminate()


def plans(prefix: str, count: int, adapter_ids: list[str], seed: int) -> list[Plan]:
    rng = random.Random(seed)
    return [
        Plan(
            f"{prefix}-{i}",
            [rng.randrange(1, 200) for _ in range(rng.randrange(3, 24))],
            adapter_ids[i % len(adapter_ids)] if i % 8 else None,
            rng.randrange(4, 24),
        )
        for i in range(count)
    ]


async def run(stub: inference_pb2_grpc.InferenceAsyncStub, plan: Plan) -> Streamed:
    return await collect(
        stub,
        request(
            plan.prompt, adapter=plan.adapter, max_new_tokens=plan.max_new_tokens, request_id=plan.request_id
        ),
    )


def expected_ledger(done: dict[str, Streamed]) -> dict[tuple[str, int], int]:
    want: dict[tuple[str, int], int] = {}
    for request_id, streamed in done.items():
        want[(request_id, PROMPT)] = streamed.prompt_tokens
        want[(request_id, COMPLETION)] = streamed.completion_tokens
    return want


async def reference_adapters(cluster: Cluster) -> dict[str, LoadedAdapter]:
    """The adapters as the store serves them, read by a cache of the test's own."""
    async with open_channel(f"127.0.0.1:{cluster.store.port}") as channel:
        cache = AdapterCache(
            adapter_store_pb2_grpc.AdapterStoreStub(channel),
            CacheConfig(
                host_bytes=1 << 26, disk_bytes=1 << 26, disk_dir=cluster.tmp_path / "reference-cache"
            ),
        )
        await cache.start()
        try:
            loaded = [await cache.get(adapter_id) for adapter_id in cluster.adapter_ids]
        finally:
            await cache.close()
    return {a.id: a for a in loaded}


async def test_32_streams_over_20_adapters_equal_the_engine_and_fill_the_ledger_exactly(
    cluster: Cluster,
) -> None:
    batch = plans("conc", 32, cluster.adapter_ids, seed=1)
    async with open_channel(f"127.0.0.1:{cluster.worker.port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streamed = await asyncio.gather(*(run(stub, p) for p in batch))
    adapters = await reference_adapters(cluster)
    by_key = {a.key: a for a in adapters.values()}
    work = [(p.prompt, adapters[p.adapter].key if p.adapter else None, p.max_new_tokens) for p in batch]
    expected = await asyncio.to_thread(reference_outputs, cluster.model, by_key, work, 8)
    for plan, got, engine_ids in zip(batch, streamed, expected, strict=True):
        assert got.token_ids == engine_ids, plan.request_id
        assert (got.prompt_tokens, got.completion_tokens) == (len(plan.prompt), plan.max_new_tokens)
    want = expected_ledger({p.request_id: s for p, s in zip(batch, streamed, strict=True)})
    await wait_until(lambda: ledger_counts(cluster.database_url) == want, timeout=60, what="an exact ledger")


async def _load(
    stub: inference_pb2_grpc.InferenceAsyncStub,
    adapter_ids: list[str],
    stop: asyncio.Event,
    done: dict[str, Streamed],
) -> None:
    """Waves of 16 concurrent streams until `stop` is set."""
    wave = 0
    while not stop.is_set():
        batch = plans(f"load{wave}", 16, adapter_ids, seed=wave)
        for plan, streamed in zip(batch, await asyncio.gather(*(run(stub, p) for p in batch)), strict=True):
            done[plan.request_id] = streamed
        wave += 1


async def test_attribution_down_30s_under_load_loses_and_doubles_nothing(cluster: Cluster) -> None:
    done: dict[str, Streamed] = {}
    stop = asyncio.Event()
    async with open_channel(f"127.0.0.1:{cluster.worker.port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        load = asyncio.create_task(_load(stub, cluster.adapter_ids, stop, done))
        try:
            await asyncio.sleep(3)
            cluster.attribution.kill()
            before_outage = len(done)
            await asyncio.sleep(OUTAGE_S)
            during_outage = len(done) - before_outage
            await cluster.restart_attribution().wait_ready()
            await asyncio.sleep(2)
        finally:
            stop.set()
            await load
    assert during_outage >= 16, "generation stalled while attribution was down"
    want = expected_ledger(done)
    await wait_until(lambda: ledger_counts(cluster.database_url) == want, timeout=90, what="an exact ledger")


async def test_a_worker_killed_with_a_full_spool_replays_it_after_restart(cluster: Cluster) -> None:
    cluster.attribution.kill()  # usage can only pile up in the spool now
    batch = plans("crash", 24, cluster.adapter_ids, seed=7)
    async with open_channel(f"127.0.0.1:{cluster.worker.port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streamed = await asyncio.gather(*(run(stub, p) for p in batch))
    spool = cluster.tmp_path / "spool"
    await wait_until(lambda: any(spool.glob("seg-*")), timeout=10, what="a spooled batch")
    await asyncio.sleep(0.5)  # the last records' flush (every 50 ms)
    cluster.worker.kill()
    assert any(spool.glob("seg-*"))
    await cluster.restart_attribution().wait_ready()
    await cluster.restart_worker().wait_ready()
    want = expected_ledger({p.request_id: s for p, s in zip(batch, streamed, strict=True)})
    await wait_until(lambda: ledger_counts(cluster.database_url) == want, timeout=60, what="an exact ledger")
    with contextlib.suppress(FileNotFoundError):
        await wait_until(lambda: not any(spool.glob("seg-*")), timeout=10, what="an acked spool")
