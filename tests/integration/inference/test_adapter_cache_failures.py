"""Failures reach every waiter as a clean status, and leave nothing bad behind in any tier."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from services.inference.adapter_cache import AdapterCorrupt, AdapterKey
from services.inference.adapter_cache.disk_tier import STAGING
from services.inference.adapter_cache.loaded import WEIGHTS_FILE
from tests.integration.inference.cache_kit import Store, open_cache, small_adapter, start_store
from tests.kit.work_clock import WorkClock


@pytest.fixture
async def store(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[Store]:
    running = await start_store(tmp_path / "store", tiny_llama_dir)
    yield running
    await running.stop()


def ref(adapter_id: str, version: str = "") -> AdapterKey:
    return AdapterKey(adapter_id, version)


async def gather_errors(*calls: object) -> list[BaseException]:
    results = await asyncio.gather(*calls, return_exceptions=True)  # type: ignore[call-overload]
    assert all(isinstance(r, BaseException) for r in results), results
    return list(results)


async def test_a_corrupt_blob_is_refused_for_every_waiter_and_kept_nowhere(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=1), "acme/rot")
    store.corrupt_blob(info.digest)
    cache = await open_cache(store, tmp_path / "cache", download_attempts=2)
    errors = await gather_errors(*(cache.get(ref("acme/rot", info.version)) for _ in range(50)))
    assert all(isinstance(e, AdapterCorrupt) for e in errors)
    assert errors[0] is errors[-1]  # one load, one verdict, shared by every waiter
    assert isinstance(errors[0], ServiceError) and errors[0].code == grpc.StatusCode.DATA_LOSS
    assert "acme/rot" in errors[0].message and "sha256" in errors[0].message
    assert store.servicer.calls["Download"] == 2  # retried once, then failed cleanly
    stats = cache.stats()
    assert (stats.corrupt_downloads, stats.failed_loads, stats.loading) == (2, 1, 0)
    assert (stats.disk_entries, stats.disk_bytes, stats.host_entries) == (0, 0, 0)
    assert not cache.disk.path(info.digest).exists() and list((tmp_path / "cache" / STAGING).iterdir()) == []

    store.corrupt_blob(info.digest)  # flipped back: the store is healthy again, failures are not cached
    assert ((await cache.get(ref("acme/rot", info.version))).adapter).digest == info.digest


@pytest.mark.parametrize("latest", [False, True])
async def test_a_store_that_lies_about_the_bytes_is_caught_by_the_digest(
    store: Store, tiny_llama_dir: Path, tmp_path: Path, latest: bool
) -> None:
    """The corrupt bytes arrive with their own sha256 declared: only the adapter's digest catches them."""
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=2), "acme/liar")
    store.servicer.flip_byte = True
    cache = await open_cache(store, tmp_path / "cache", download_attempts=1)
    wanted = ref("acme/liar", "" if latest else info.version)
    errors = await gather_errors(*(cache.get(wanted) for _ in range(5)))
    assert all(isinstance(e, AdapterCorrupt) and "expected" in e.message for e in errors)
    assert store.servicer.calls["Download"] == 1 and cache.stats().disk_entries == 0
    assert not cache.disk.path(info.digest).exists()


async def test_store_errors_map_to_clear_statuses(store: Store, tiny_llama_dir: Path, tmp_path: Path) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=3), "acme/real")
    cache = await open_cache(store, tmp_path / "cache")
    with pytest.raises(NotFound, match="acme/ghost"):
        await cache.get(ref("acme/ghost"))
    with pytest.raises(NotFound, match="acme/ghost"):
        await cache.get(ref("acme/ghost", info.version))
    with pytest.raises(InvalidArgument, match="not a valid adapter id"):
        await cache.get(ref("Not An Id"))
    with pytest.raises(InvalidArgument, match=r"adapter\.id"):
        await cache.get(ref(""))
    tight = await open_cache(store, tmp_path / "tight", host_bytes=1024)
    with pytest.raises(ResourceExhausted, match="host RAM"):
        await tight.get(ref("acme/real", info.version))
    assert cache.stats().failed_loads == 1  # the ghost's Download; the rest failed before any load


async def test_with_the_store_down_cached_adapters_serve_and_cold_ones_fail_unavailable(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    infos = [
        await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i), f"down{i}")
        for i in range(3)
    ]
    probe = await open_cache(store, tmp_path / "probe")
    one = ((await probe.get(ref("down0"))).adapter).size_bytes
    cache = await open_cache(
        store, tmp_path / "cache", host_bytes=one, latest_ttl_s=0.01, download_timeout_s=2.0
    )
    on_disk = (await cache.get(ref("down1", infos[1].version))).adapter
    in_ram = (
        await cache.get(ref("down0"))
    ).adapter  # resolved as latest; pushes down1 out of RAM onto disk only
    assert cache.resident(on_disk.key) is None and cache.resident(in_ram.key) is in_ram

    await store.server.stop()
    await asyncio.sleep(0.02)  # the latest resolution of down0 has expired
    assert (await cache.get(ref("down0"))).adapter is in_ram  # stale "latest" is still a real version
    assert ((await cache.get(ref("down1", infos[1].version))).adapter).digest == infos[1].digest  # from disk
    started = WorkClock()
    for cold in (ref("down2"), ref("down2", infos[2].version)):
        with pytest.raises(Unavailable, match="adapter store") as failed:
            await cache.get(cold)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.retry_after_s
    assert started.elapsed() < 2.0  # refused at once, well within one call's deadline
    stats = cache.stats()
    assert stats.stale_latest == 1 and stats.disk_hits == 1 and stats.failed_loads == 1


async def test_a_corrupt_disk_entry_is_dropped_and_fetched_again(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=4), "acme/bitrot")
    cache = await open_cache(store, tmp_path / "cache")
    await cache.get(ref("acme/bitrot", info.version))
    weights = cache.disk.path(info.digest) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))

    restarted = await open_cache(store, tmp_path / "cache")
    loaded = (await restarted.get(ref("acme/bitrot", info.version))).adapter
    assert loaded.digest == info.digest
    stats = restarted.stats()
    assert (stats.corrupt_disk_entries, stats.store_downloads, stats.disk_entries) == (1, 1, 1)
    assert weights.read_bytes() != bytes(data)  # the good bytes are back on disk


async def test_a_failing_cache_disk_fails_cold_loads_unavailable(
    store: Store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    info = await store.upload(small_adapter(tiny_llama_dir, tmp_path / "a", seed=5), "acme/nodisk")
    cache = await open_cache(store, tmp_path / "cache")
    (tmp_path / "cache" / STAGING).write_text("not a folder")  # every staging mkdir now fails
    with pytest.raises(Unavailable, match="cache disk failed") as failed:
        await cache.get(ref("acme/nodisk", info.version))
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE  # the gateway may retry on another worker
    assert cache.stats().failed_loads == 1 and store.servicer.calls["Download"] == 0
