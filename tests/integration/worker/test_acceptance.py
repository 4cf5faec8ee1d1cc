"""The worker's acceptance, with real processes: `openlora worker serve`, the adapter store on
SeaweedFS, attribution on PostgreSQL.

- 32 concurrent streams over 20 adapters equal the engine's own output, and the ledger holds exactly
  each request's prompt and completion tokens;
- the worker SIGKILLed with usage still in its spool, and its last tokens in its journal only (no
  flush since), then restarted: the ledger ends equal to the tokens streamed (attribution down for
  60 s under load through the gateway is `tests/e2e/test_faults.py`);
- the worker's engine process SIGKILLed under streaming load: every stream ends UNAVAILABLE at once,
  a new engine serves, and the ledger holds, to the token, what each client received before the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, attribution_pb2, inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from services.common.trust.roles import GATEWAY
from services.inference.adapter_cache import AdapterCache, CacheConfig, LoadedAdapter
from tests.integration.inference.cache_kit import BASE, small_adapter
from tests.integration.worker.kit import (
    Streamed,
    collect,
    ledger_counts,
    reference_outputs,
    request,
    served_requests,
)
from tests.integration.worker.processes import (
    ServiceProcess,
    attribution_process,
    store_process,
    worker_process,
)
from tests.kit.postgres import create_database, drop_database
from tests.kit.seaweedfs import S3Endpoint
from tests.kit.service_auth import as_role, trusted
from tests.kit.waits import wait_until, within

pytestmark = pytest.mark.slow

NUM_ADAPTERS = 20
PROMPT, COMPLETION = attribution_pb2.PROMPT, attribution_pb2.COMPLETION
ENGINE_MODULE = "services.inference.engine_process.core"  # what a worker's engine child runs
LONG = 3000  # tokens: far more than a stream produces before its engine is killed


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
    async with open_channel(f"127.0.0.1:{store_port}", **trusted("store")) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        config_json = (model / "config.json").read_text()
        await stub.RegisterBaseModel(store_pb.RegisterBaseModelRequest(name=BASE, config_json=config_json))
        from openlora.files import adapter_files
        from openlora.transfer import upload

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
    async with open_channel(f"127.0.0.1:{cluster.store.port}", **trusted("store")) as channel:
        cache = AdapterCache(
            adapter_store_pb2_grpc.AdapterStoreStub(channel),
            CacheConfig(
                host_bytes=1 << 26, disk_bytes=1 << 26, disk_dir=cluster.tmp_path / "reference-cache"
            ),
        )
        await cache.start()
        try:
            loaded = [(await cache.get(adapter_id)).adapter for adapter_id in cluster.adapter_ids]
        finally:
            await cache.close()
    return {a.id: a for a in loaded}


async def test_32_streams_over_20_adapters_equal_the_engine_and_fill_the_ledger_exactly(
    cluster: Cluster,
) -> None:
    batch = plans("conc", 32, cluster.adapter_ids, seed=1)
    async with open_channel(f"127.0.0.1:{cluster.worker.port}", **as_role(GATEWAY, "worker")) as channel:
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


async def test_a_worker_killed_with_a_full_spool_replays_it_after_restart(cluster: Cluster) -> None:
    cluster.attribution.kill()  # usage can only pile up in the spool now
    batch = plans("crash", 24, cluster.adapter_ids, seed=7)
    async with open_channel(f"127.0.0.1:{cluster.worker.port}", **as_role(GATEWAY, "worker")) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        streamed = await asyncio.gather(*(run(stub, p) for p in batch))
    spool = cluster.tmp_path / "spool"
    # Killed right away: the last streamed tokens are not in a flushed batch yet, only in the journal,
    # which the restart recovers into the spool.
    cluster.worker.kill()
    assert list(spool.glob("journal-*.bin"))
    await cluster.restart_attribution().wait_ready()
    await cluster.restart_worker().wait_ready()
    want = expected_ledger({p.request_id: s for p, s in zip(batch, streamed, strict=True)})
    await wait_until(lambda: ledger_counts(cluster.database_url) == want, timeout=60, what="an exact ledger")
    with contextlib.suppress(FileNotFoundError):
        await wait_until(lambda: not any(spool.glob("seg-*")), timeout=10, what="an acked spool")


def engine_pids(worker: ServiceProcess) -> list[int]:
    """The live engine processes of a worker process: its children running the engine core."""
    assert worker.process is not None
    pids = []
    for child in psutil.Process(worker.process.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and ENGINE_MODULE in child.cmdline():
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            pass  # the one just killed, reaped meanwhile
    return pids


async def stream_until_error(
    stub: inference_pb2_grpc.InferenceAsyncStub, plan: Plan, received: dict[str, list[int]]
) -> tuple[grpc.StatusCode | None, float]:
    """Append each chunk's token count to `received`; the status the stream ended with (None: OK), and
    when."""
    message = request(
        plan.prompt, adapter=plan.adapter, max_new_tokens=plan.max_new_tokens, request_id=plan.request_id
    )
    try:
        async for chunk in stub.Generate(message, timeout=120):
            received[plan.request_id].append(len(chunk.token_ids))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), asyncio.get_running_loop().time()
    return None, asyncio.get_running_loop().time()


async def test_a_killed_engine_ends_every_stream_unavailable_and_bills_exactly_what_each_client_got(
    cluster: Cluster,
) -> None:
    loop = asyncio.get_running_loop()
    adapters = cluster.adapter_ids[:3]
    batch = [
        Plan(f"engine-kill-{i}", [5 + i, 17, 29 + i, 41], adapters[i % 4] if i % 4 < 3 else None, LONG)
        for i in range(8)
    ]
    # The adapters made resident first, so that the long streams all start at once.
    warm = [Plan(f"warm-{a}", [3, 4], a, 2) for a in adapters]
    received: dict[str, list[int]] = {plan.request_id: [] for plan in batch}  # tokens per chunk
    async with open_channel(f"127.0.0.1:{cluster.worker.port}", **as_role(GATEWAY, "worker")) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        warmed = await asyncio.gather(*(run(stub, p) for p in warm))
        streamed = {p.request_id: s for p, s in zip(warm, warmed, strict=True)}
        streams = [asyncio.create_task(stream_until_error(stub, plan, received)) for plan in batch]
        # A few chunks and tokens each, so that what must be billed is more than the first token.
        await wait_until(
            lambda: (
                all(len(c) >= 3 and sum(c) >= 10 for c in received.values()) or any(s.done() for s in streams)
            ),
            60,
            "chunks on every stream",
        )
        assert not any(s.done() for s in streams), [s.result() for s in streams if s.done()]
        [engine_pid] = engine_pids(cluster.worker)
        psutil.Process(engine_pid).kill()
        killed = loop.time()
        ends = await within(asyncio.gather(*streams), 30)
        for plan, (code, ended) in zip(batch, ends, strict=True):
            assert code == grpc.StatusCode.UNAVAILABLE, (plan.request_id, code)
            assert ended - killed < 5.0, (plan.request_id, ended - killed)
            assert 0 < sum(received[plan.request_id]) < LONG, plan.request_id

        while engine_pids(cluster.worker) in ([], [engine_pid]) or await health_status(channel) != "SERVING":
            assert loop.time() - killed < 30.0, "not SERVING on a new engine 30 s after the kill"
            await asyncio.sleep(0.1)
        [new_pid] = engine_pids(cluster.worker)
        assert new_pid != engine_pid
        after = Plan("after-restart", [9, 8, 7], adapters[0], 6)
        streamed[after.request_id] = served = await run(stub, after)
        assert (served.prompt_tokens, served.completion_tokens, len(served.token_ids)) == (3, 6, 6)

    for plan in batch:  # the prompt is billed with the first token; every token sent is billed, no more
        got = sum(received[plan.request_id])
        streamed[plan.request_id] = Streamed([], "", 0, len(plan.prompt) if got else 0, got)
    want = {key: count for key, count in expected_ledger(streamed).items() if count}
    await wait_until(lambda: ledger_counts(cluster.database_url) == want, timeout=60, what="an exact ledger")
    served_ids = served_requests(cluster.database_url)
    assert all(len(served_ids[plan.request_id]) == 1 for plan in batch), served_ids
