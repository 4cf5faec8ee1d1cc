"""10,000 random loads, pins and evictions over 30 adapters with tiny budgets: memory stays flat."""

from __future__ import annotations

import gc
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.inference.adapter_cache import LoadedAdapter
from tests.integration.inference.cache_kit import Store, open_cache, small_adapter, start_store

ADAPTERS = 30
CYCLES = 10_000
WARMUP = 1_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.fixture
async def store(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[Store]:
    running = await start_store(tmp_path / "store", tiny_llama_dir)
    yield running
    await running.stop()


@pytest.mark.slow
async def test_random_churn_keeps_budgets_and_memory_flat(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    keys = []
    for i in range(ADAPTERS):
        info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i), f"churn{i}")
        keys.append(f"{info.id}@{info.version}")
    probe = await open_cache(store, tmp_path / "probe")
    one = ((await probe.get(keys[0])).adapter).size_bytes
    disk_one = probe.stats().disk_bytes
    cache = await open_cache(
        store, tmp_path / "cache", host_bytes=4 * one, disk_bytes=10 * disk_one, load_samples=256
    )
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) ** 0.5 for rank in range(ADAPTERS)]  # a few hot adapters, a long tail
    running: deque[str] = deque()  # the "running batch": at most two pinned adapters
    baseline = 0
    started = time.monotonic()
    for cycle in range(CYCLES):
        if cycle == WARMUP:
            gc.collect()
            baseline = rss_bytes()
        key = rng.choices(keys, weights)[0]
        adapter = (await cache.get(key)).adapter
        assert adapter.key == key
        if rng.random() < 0.3 and cache.pin(key) is not None:
            running.append(key)
            if len(running) > 2:
                cache.unpin(running.popleft())
        if rng.random() < 0.05:
            cache.prefetch(rng.choice(keys))
        stats = cache.stats()
        pinned_bytes = sum(one * count for count in stats.pinned.values())
        assert stats.host_bytes <= 4 * one + pinned_bytes + one  # over budget only by pins + newcomer
        # an entry being read when a commit evicts goes once read: loads in flight bound the excess
        assert stats.disk_bytes <= 10 * disk_one + stats.loading * disk_one
        assert set(stats.pinned) <= set(cache.host.keys())  # pinned adapters were never evicted
        del adapter
    while running:
        cache.unpin(running.popleft())
    await cache.close()
    gc.collect()
    elapsed = time.monotonic() - started
    growth = (rss_bytes() - baseline) / baseline
    stats = cache.stats()
    print(
        f"\n{CYCLES} cycles in {elapsed:.1f} s; host hits {stats.host_hits}, disk hits {stats.disk_hits}, "
        f"downloads {stats.store_downloads}, evictions {stats.host_evictions}/{stats.disk_evictions}, "
        f"rss growth {growth * 100:.2f}%"
    )
    assert stats.host_bytes <= 4 * one and stats.disk_bytes <= 10 * disk_one
    assert stats.disk_hits > 100 and stats.store_downloads > 100 and stats.host_evictions > 1000
    assert len(stats.load_seconds["store"]) <= 256 and stats.loading == 0
    live = [o for o in gc.get_objects() if type(o) is LoadedAdapter]  # type(): no attribute lookups
    assert len(live) <= stats.host_entries + probe.stats().host_entries  # evicted adapters were freed
    assert growth < 0.05
