"""The adapter cache against a real adapter store on loopback: tiers, restarts, latest, dedup, pins."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.inference.adapter_cache import AdapterCache, AdapterKey, CacheConfig, LoadedAdapter
from tests.integration.inference.cache_kit import Store, open_cache, small_adapter, start_store
from tests.kit.adapters import make_peft_adapter
from tests.kit.waits import within


@pytest.fixture
async def store(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[Store]:
    running = await start_store(tmp_path / "store", tiny_llama_dir)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
def peft_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT adapter: rank 8, attention and MLP projections."""
    out = tmp_path_factory.mktemp("peft")
    return make_peft_adapter(tiny_llama_dir, out, rank=8, targets=["q_proj", "v_proj", "down_proj"], seed=3)


def ref(adapter_id: str, version: str = "") -> AdapterKey:
    return AdapterKey(adapter_id, version)


async def test_a_peft_adapter_arrives_as_float32_pairs_equal_to_what_peft_saved(
    store: Store, peft_adapter: Path, tmp_path: Path
) -> None:
    info = await store.upload(peft_adapter, "acme/poet")
    cache = await open_cache(store, tmp_path / "cache")
    loaded = (await cache.get(ref("acme/poet", info.version))).adapter
    assert (loaded.id, loaded.version, loaded.digest) == ("acme/poet", info.version, info.digest)
    assert (loaded.rank, loaded.alpha, loaded.scaling) == (8, 16.0, 2.0)
    assert loaded.target_modules == ("down_proj", "q_proj", "v_proj")
    saved = load_file(peft_adapter / "adapter_model.safetensors")
    assert len(loaded.weights) == len(saved) // 2 == 2 * 3  # 2 layers x 3 modules
    for path, (lora_a, lora_b) in loaded.weights.items():
        assert lora_a.dtype == lora_b.dtype == torch.float32 and lora_a.shape[0] == lora_b.shape[1] == 8
        assert torch.equal(lora_a, saved[f"base_model.model.{path}.lora_A.weight"])
        assert torch.equal(lora_b, saved[f"base_model.model.{path}.lora_B.weight"])
    assert loaded.size_bytes == sum(t.numel() * 4 for t in saved.values())
    stats = cache.stats()
    assert (stats.host_misses, stats.disk_misses, stats.store_downloads) == (1, 1, 1)
    assert stats.host_bytes == loaded.size_bytes


async def test_tiers_hit_in_order_and_the_disk_tier_survives_a_restart(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    infos = [
        await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i), f"a{i}")
        for i in range(3)
    ]
    probe = await open_cache(store, tmp_path / "probe")
    one = ((await probe.get(ref("a0", infos[0].version))).adapter).size_bytes
    cache = await open_cache(store, tmp_path / "cache", host_bytes=2 * one)
    for info in infos:
        await cache.get(ref(info.id, info.version))
        assert cache.stats().host_bytes <= 2 * one
    assert cache.resident(ref("a0", infos[0].version)) is None  # evicted from RAM, still on disk
    again = (await cache.get(ref("a0", infos[0].version))).adapter
    stats = cache.stats()
    assert (stats.store_downloads, stats.disk_hits, stats.host_evictions) == (3, 1, 2)
    assert (await cache.get(ref("a0", infos[0].version))).adapter is again
    assert cache.stats().host_hits == 1
    entry = cache.disk.path(infos[0].digest)
    assert entry.parent.name == infos[0].digest[:2]
    assert json.loads((entry / "refs.json").read_text()) == [f"a0@{infos[0].version}"]

    restarted = await open_cache(store, tmp_path / "cache")  # a new process on the same folder
    assert restarted.stats().disk_entries == 3
    for info in infos:
        loaded = (await restarted.get(ref(info.id, info.version))).adapter
        assert loaded.digest == info.digest
    stats = restarted.stats()
    assert (stats.disk_hits, stats.store_downloads, stats.store_gets) == (3, 0, 0)  # no store call at all


async def test_latest_is_resolved_once_per_ttl(store: Store, tiny_llama_dir: Path, tmp_path: Path) -> None:
    first = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "v1", seed=1), "acme/chat")
    cache = await open_cache(store, tmp_path / "cache", latest_ttl_s=1.0)
    assert cache.resident(ref("acme/chat")) is None
    hot = [(await cache.get(ref("acme/chat"))).adapter for _ in range(20)]
    assert all(a is hot[0] for a in hot) and hot[0].version == first.version
    assert store.servicer.calls["Get"] == 1 and store.servicer.calls["Download"] == 1
    assert cache.resident(ref("acme/chat")) is hot[0]
    assert cache.resident("acme/chat") is hot[0] and cache.resident(hot[0].key) is hot[0]

    second = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "v2", seed=2), "acme/chat")
    assert ((await cache.get(ref("acme/chat"))).adapter).version == first.version  # within the TTL
    await asyncio.sleep(1.05)
    assert cache.resident(ref("acme/chat")) is None  # the resolution went stale
    newer = (await cache.get(ref("acme/chat"))).adapter
    assert newer.version == second.version and newer.digest == second.digest
    assert store.servicer.calls["Get"] == 2 and store.servicer.calls["Download"] == 2


async def test_fifty_concurrent_requests_for_a_cold_adapter_download_it_once(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=7), "acme/cold")
    cache = await open_cache(store, tmp_path / "cache")
    by_version = [cache.get(ref("acme/cold", info.version)) for _ in range(25)]
    by_latest = [cache.get(ref("acme/cold")) for _ in range(25)]
    loaded = await asyncio.gather(*by_version, *by_latest)
    assert all(a is loaded[0] for a in loaded)
    assert store.servicer.calls["Download"] == 1 and store.servicer.calls["Get"] == 1
    stats = cache.stats()
    assert stats.store_downloads == 1 and stats.host_misses == 50 and stats.joined_loads == 49
    assert stats.loading == 0


async def test_a_waiter_that_gives_up_does_not_cancel_the_load_for_the_others(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=8), "acme/patient")
    cache = await open_cache(store, tmp_path / "cache")
    impatient = asyncio.ensure_future(cache.get(ref("acme/patient", info.version)))
    patient = asyncio.ensure_future(cache.get(ref("acme/patient", info.version)))
    await asyncio.sleep(0)
    impatient.cancel()
    assert (await patient).adapter.digest == info.digest
    assert impatient.cancelled() and store.servicer.calls["Download"] == 1


async def test_prefetch_from_the_engine_thread_makes_the_adapter_resident(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=9), "acme/pre")
    landed: list[LoadedAdapter] = []
    arrived = asyncio.Event()

    class Landing:  # an observer: the cache tells it each load that lands in host RAM
        def adapter_loaded(self, adapter: LoadedAdapter, tier: str, seconds: float) -> None:
            assert tier == "store" and seconds > 0
            landed.append(adapter)
            arrived.set()

    config = CacheConfig(host_bytes=1 << 24, disk_bytes=1 << 26, disk_dir=tmp_path / "cache")
    cache = AdapterCache(store.stub, config)
    cache.observe(Landing())
    await cache.start()
    key = f"acme/pre@{info.version}"

    def enqueue_five_requests() -> None:  # what the engine does as requests arrive
        for _ in range(5):
            cache.prefetch(key)

    engine_thread = threading.Thread(target=enqueue_five_requests)
    engine_thread.start()
    engine_thread.join()
    await within(arrived.wait(), timeout=10)
    assert cache.resident(key) is not None and landed == [cache.resident(key)]
    assert store.servicer.calls["Download"] == 1
    cache.prefetch(key)  # resident already: nothing to do
    await asyncio.sleep(0.05)
    assert store.servicer.calls["Download"] == 1 and cache.stats().host_misses == 1


async def test_the_running_batch_is_never_evicted(store: Store, tiny_llama_dir: Path, tmp_path: Path) -> None:
    infos = [
        await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i), f"b{i}")
        for i in range(5)
    ]
    keys = [f"{i.id}@{i.version}" for i in infos]
    probe = await open_cache(store, tmp_path / "probe")
    one = ((await probe.get(keys[0])).adapter).size_bytes
    cache = await open_cache(store, tmp_path / "cache", host_bytes=2 * one)
    for key in keys[:2]:
        await cache.get(key)
        assert cache.pin(key) is not None  # the step loop admitted requests on both
    for key in keys[2:]:
        loaded = (await cache.get(key)).adapter  # served to its request, then the first to go
        assert keys[0] in cache.host and keys[1] in cache.host
        assert cache.stats().host_bytes <= 2 * one + loaded.size_bytes  # pins + the newcomer only
    assert cache.stats().pinned == {keys[0]: 1, keys[1]: 1}
    cache.unpin(keys[0])
    assert cache.resident(keys[0]) is None and cache.stats().host_bytes <= 2 * one
    cache.unpin(keys[1])
    assert cache.stats().host_bytes <= 2 * one and cache.stats().pinned == {}


async def test_cold_fetch_time_from_a_local_store(store: Store, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Records the p50 of a cold fetch (store → disk → host) and of a disk hit, for the report."""
    infos = [
        await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i, rank=8), f"t{i}")
        for i in range(9)
    ]
    cache = await open_cache(store, tmp_path / "cache")
    for info in infos:
        await cache.get(ref(info.id, info.version))
    restarted = await open_cache(store, tmp_path / "cache")
    for info in infos:
        await restarted.get(ref(info.id, info.version))
    store_p50 = cache.stats().load_p50_s("store")
    disk_p50 = restarted.stats().load_p50_s("disk")
    assert store_p50 is not None and disk_p50 is not None
    print(f"\ncold fetch p50 {store_p50 * 1e3:.1f} ms, disk hit p50 {disk_p50 * 1e3:.1f} ms")
    assert len(cache.stats().load_seconds["store"]) == 9
    assert store_p50 < 1.0 and disk_p50 < statistics.median([store_p50, 1.0])
