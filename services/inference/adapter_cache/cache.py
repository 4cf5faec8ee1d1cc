"""`AdapterCache`: host RAM ← local disk ← adapter store, with deduplicated background loads.

Request handlers `await get(key)`, which answers with the adapter, the tier it came from and how long
its load took. Around a request: `pin`/`unpin`; `resident(key)` and `prefetch(key)` never block. Load
times reach every `CacheObserver` (`observe()`), e.g. a Prometheus histogram; `snapshot()` gives the
counters to other threads (a metrics scrape) without reading a structure while it changes.

State other than the host tier lives on the event loop that called `start()`; file work runs in
worker threads. N concurrent misses of one adapter share one load task (so one download), and each
waiter awaits it shielded, so a caller that gives up does not cancel the load for the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Protocol

from openlora.v1 import adapter_store_pb2_grpc

from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError, Unavailable
from services.inference.adapter_cache.config import CacheConfig
from services.inference.adapter_cache.disk_tier import DiskTier
from services.inference.adapter_cache.errors import AdapterCorrupt
from services.inference.adapter_cache.host_tier import HostTier
from services.inference.adapter_cache.key import AdapterKey, is_source_uri
from services.inference.adapter_cache.latest import LatestVersions
from services.inference.adapter_cache.loaded import LoadedAdapter, parse_adapter
from services.inference.adapter_cache.mixing import MIX_ID, MixSpec, build_mixed_adapter, mix_version
from services.inference.adapter_cache.stats import CacheStats, Counters
from services.inference.adapter_cache.store import StoreFetcher

log = logging.getLogger("openlora.worker.adapter_cache")


@dataclass(frozen=True)
class CacheEntry:
    """What `get` found: the adapter, and where from (`host`, or the tier a load that finished while
    the caller waited came from: `disk`, `store`, `mix`) with that load's seconds (0 for a hit)."""

    adapter: LoadedAdapter
    tier: str
    load_seconds: float = 0.0


class CacheObserver(Protocol):
    def adapter_loaded(self, adapter: LoadedAdapter, tier: str, seconds: float) -> None:
        """A load landed in host RAM (on the cache's event loop): from `disk`, `store` or a `mix`."""


class AdapterCache:
    def __init__(self, store: adapter_store_pb2_grpc.AdapterStoreAsyncStub, config: CacheConfig) -> None:
        self.config = config
        self.host = HostTier(config.host_bytes)
        self.disk = DiskTier(config.disk_dir, config.disk_bytes)
        self.fetcher = StoreFetcher(store, config.download_timeout_s)
        self._observers: list[CacheObserver] = []
        self._counters = Counters(config.load_samples)
        self.latest = LatestVersions(self.fetcher, config.latest_ttl_s, config.import_schemes)
        self._loading: dict[str, asyncio.Task[CacheEntry]] = {}
        self._prefetches: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def observe(self, observer: CacheObserver) -> None:
        self._observers.append(observer)

    async def start(self) -> None:
        """Index the disk tier left by earlier runs; bind the cache to the running event loop."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.config.disk_dir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(self.disk.scan)

    async def close(self) -> None:
        """Cancel loads in flight (their waiters get CancelledError) and prefetches."""
        tasks = [*self._loading.values(), *self.latest.in_flight(), *self._prefetches]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # the engine's side (any thread)

    def resident(self, key: AdapterKey | str) -> LoadedAdapter | None:
        """The adapter if it is in host RAM now; never blocks, never calls the store.

        A latest-version key is resident only while its resolution is fresh (see latest_ttl_s). A
        string is parsed as `id` or `id@version` (for tools and tests)."""
        key = AdapterKey.of(key)
        if not key.version:
            latest = self.latest.fresh(key.id)
            if latest is None:
                return None
            key = AdapterKey(latest.adapter_id, latest.version)
        return self.host.lookup(key.name)

    def pin(self, key: str) -> LoadedAdapter | None:
        """Keep a resident adapter (key `id@version`) in host RAM until unpinned; None if not resident."""
        return self.host.pin(key)

    def unpin(self, key: str) -> None:
        self.host.unpin(key)

    def prefetch(self, key: AdapterKey | str) -> None:
        """Start loading in the background (fire and forget; failures are logged and counted)."""
        if self._loop is None:
            raise RuntimeError("AdapterCache.start() has not run")
        key = AdapterKey.of(key)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._spawn_prefetch(key.id, key.version)
        else:
            self._loop.call_soon_threadsafe(self._spawn_prefetch, key.id, key.version)

    def snapshot(self, timeout_s: float = 2.0) -> CacheStats | None:
        """`stats()` from any thread, taken on the cache's event loop, where the counters and tiers
        change, so nothing is read while it is being changed. None when the loop does not answer
        within `timeout_s` (busy, stopped or closed)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return self.stats()
        except RuntimeError:
            pass  # no loop in this thread: the usual case (a metrics scrape)
        taken: concurrent.futures.Future[CacheStats] = concurrent.futures.Future()

        def take() -> None:
            try:
                taken.set_result(self.stats())
            except BaseException as exc:
                taken.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return taken.result(timeout_s)
        except (RuntimeError, concurrent.futures.TimeoutError):  # the loop closed, or is too busy
            return None

    def stats(self) -> CacheStats:
        """Counters and sizes; on the cache's event loop (other threads: `snapshot()`)."""
        c = self._counters
        return CacheStats(
            host_hits=c.host_hits,
            host_misses=c.host_misses,
            disk_hits=c.disk_hits,
            disk_misses=c.disk_misses,
            store_gets=self.fetcher.gets,
            store_downloads=self.fetcher.downloads,
            store_imports=self.fetcher.imports,
            joined_loads=c.joined_loads,
            corrupt_downloads=c.corrupt_downloads,
            corrupt_disk_entries=c.corrupt_disk_entries,
            failed_loads=c.failed_loads,
            stale_latest=self.latest.stale_answers,
            host_evictions=self.host.evictions,
            disk_evictions=self.disk.evictions,
            host_bytes=self.host.bytes,
            disk_bytes=self.disk.bytes,
            host_entries=len(self.host),
            disk_entries=len(self.disk),
            pinned=self.host.pinned(),
            loading=len(self._loading),
            load_seconds={tier: tuple(s) for tier, s in c.load_seconds.items()},
        )

    # the request side (the cache's event loop)

    async def get(self, key: AdapterKey | str) -> CacheEntry:
        """The adapter, from host RAM, else local disk, else the store; raises a ServiceError. A
        string is parsed as `id` or `id@version` (for tools and tests)."""
        key = AdapterKey.of(key)
        adapter_id, version = key.id, key.version
        if not adapter_id:
            raise InvalidArgument("adapter.id", "must not be empty")
        if version and is_source_uri(adapter_id):
            raise InvalidArgument("adapter.version", "must be empty when adapter.id is a source URI")
        digest = ""
        if not version:
            latest = await self.latest.resolve(adapter_id)
            adapter_id, version, digest = latest.adapter_id, latest.version, latest.digest
        adapter = self.host.lookup(AdapterKey(adapter_id, version).name)
        if adapter is not None:
            self._counters.host_hits += 1
            return CacheEntry(adapter, "host")
        return await asyncio.shield(self._start_load(adapter_id, version, digest))

    async def get_mix(
        self, spec: MixSpec, *, max_rank: int | None = None, field: str = "adapter_mix"
    ) -> CacheEntry:
        """The mix's derived adapter: its components through `get`, then built once per mix version.

        `max_rank` (the engine's slot rank) refuses a mix the engine could not serve before any work;
        `field` names the mix in that refusal."""
        entries = await asyncio.gather(*(self.get(AdapterKey(i, v)) for i, v, _ in spec.components))
        components = [entry.adapter for entry in entries]
        rank = spec.output_rank([c.rank for c in components])
        if max_rank is not None and rank > max_rank:
            how = "the sum of the component ranks" if spec.strategy == "LINEAR" else "its rank"
            raise InvalidArgument(
                field, f"the mix's rank ({how}) is {rank}; this worker serves up to {max_rank}"
            )
        version = mix_version(spec, components)
        key = AdapterKey(MIX_ID, version).name
        derived = self.host.lookup(key)
        if derived is not None:
            self._counters.host_hits += 1
            return CacheEntry(derived, "host")
        self._counters.host_misses += 1
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._build_mix(spec, components, version))
            self._loading[key] = task
            task.add_done_callback(lambda done: self._loading.pop(key, None))
        else:
            self._counters.joined_loads += 1
        return await asyncio.shield(task)

    async def _build_mix(self, spec: MixSpec, components: list[LoadedAdapter], version: str) -> CacheEntry:
        started = time.perf_counter()
        derived = await asyncio.to_thread(build_mixed_adapter, spec, components, version)
        if derived.size_bytes > self.config.host_bytes:
            raise ResourceExhausted(
                f"the mix needs {derived.size_bytes} bytes of host RAM; "
                f"the adapter cache has {self.config.host_bytes}"
            )
        self.host.insert(derived)
        return self._landed(derived, "mix", time.perf_counter() - started)

    def _landed(self, adapter: LoadedAdapter, tier: str, seconds: float) -> CacheEntry:
        self._counters.load_seconds[tier].append(seconds)
        for observer in self._observers:
            observer.adapter_loaded(adapter, tier, seconds)
        return CacheEntry(adapter, tier, seconds)

    def _start_load(self, adapter_id: str, version: str, digest: str) -> asyncio.Task[CacheEntry]:
        """The load task of a host miss: a new one, or the one already in flight for this version."""
        self._counters.host_misses += 1
        key = AdapterKey(adapter_id, version).name
        task = self._loading.get(key)
        if task is not None:
            self._counters.joined_loads += 1
            return task
        task = asyncio.get_running_loop().create_task(self._load(adapter_id, version, digest))
        self._loading[key] = task

        def finished(done: asyncio.Task[CacheEntry]) -> None:
            self._loading.pop(key, None)
            if not done.cancelled():
                done.exception()  # retrieved here: _load logged it, and a prefetch may have no waiter

        task.add_done_callback(finished)
        return task

    def _spawn_prefetch(self, adapter_id: str, version: str, digest: str = "") -> None:
        if not version:  # resolving needs the store: do it in the background too
            task = asyncio.get_running_loop().create_task(self._prefetch_latest(adapter_id))
            self._prefetches.add(task)
            task.add_done_callback(self._prefetches.discard)
            return
        key = AdapterKey(adapter_id, version).name
        if key not in self.host and key not in self._loading:
            self._start_load(adapter_id, version, digest)

    async def _prefetch_latest(self, adapter_id: str) -> None:
        try:
            latest = await self.latest.resolve(adapter_id)
        except ServiceError as exc:  # the request that needs it will get the same error from get()
            log.warning("prefetch of adapter %s failed: %s", adapter_id, exc.message)
            return
        self._spawn_prefetch(latest.adapter_id, latest.version, latest.digest)

    async def _load(self, adapter_id: str, version: str, digest: str) -> CacheEntry:
        started = time.perf_counter()
        try:
            adapter = await self._from_disk(adapter_id, version, digest)
            tier = "disk"
            if adapter is None:
                adapter, tier = await self._from_store(adapter_id, version, digest), "store"
            if adapter.size_bytes > self.config.host_bytes:
                raise ResourceExhausted(
                    f"adapter {adapter.key} needs {adapter.size_bytes} bytes of host RAM; "
                    f"the adapter cache has {self.config.host_bytes}"
                )
        except ServiceError as exc:
            log.warning("loading adapter %s failed: %s", AdapterKey(adapter_id, version).name, exc.message)
            self._counters.failed_loads += 1
            raise
        self.host.insert(adapter)
        return self._landed(adapter, tier, time.perf_counter() - started)

    async def _from_disk(self, adapter_id: str, version: str, digest: str) -> LoadedAdapter | None:
        key = AdapterKey(adapter_id, version).name
        digest = digest or self.disk.digest_of(key) or ""
        folder = self.disk.open_entry(digest) if digest else None
        if folder is None:
            self._counters.disk_misses += 1
            return None
        try:
            adapter = await asyncio.to_thread(parse_adapter, adapter_id, version, digest, folder)
        except AdapterCorrupt as exc:
            log.warning("dropping a corrupt adapter cache entry: %s", exc.message)
            self._counters.corrupt_disk_entries += 1
            self._counters.disk_misses += 1
            adapter = None
        finally:
            await asyncio.to_thread(self.disk.close_entry, digest)
        if adapter is None:
            await asyncio.to_thread(self.disk.remove, digest)
            return None
        self._counters.disk_hits += 1
        await asyncio.to_thread(self.disk.add_ref, digest, key)
        return adapter

    async def _from_store(self, adapter_id: str, version: str, digest: str) -> LoadedAdapter:
        failure: AdapterCorrupt | None = None
        for _ in range(self.config.download_attempts):
            try:
                staged = await asyncio.to_thread(self.disk.staging_dir)
            except OSError as exc:
                raise _disk_failed(adapter_id, version, exc) from None
            try:
                info = await self.fetcher.download(adapter_id, version, staged)
                expected = digest or info.digest  # Get's answer when we have one: both must agree
                adapter = await asyncio.to_thread(parse_adapter, adapter_id, version, expected, staged)
            except AdapterCorrupt as exc:
                log.warning("refused a download: %s", exc.message)
                self._counters.corrupt_downloads += 1
                failure = exc
                shutil.rmtree(staged, ignore_errors=True)  # a few files: not worth a thread hop
                continue
            except OSError as exc:  # writing the download failed (disk full?)
                shutil.rmtree(staged, ignore_errors=True)
                raise _disk_failed(adapter_id, version, exc) from None
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            try:
                await asyncio.to_thread(self.disk.commit, staged, expected, adapter.key)
            except OSError as exc:  # the disk tier is only a cache: serve from RAM regardless
                log.warning("cannot keep adapter %s on disk: %s", adapter.key, exc)
                await asyncio.to_thread(shutil.rmtree, staged, True)
            return adapter
        assert failure is not None
        raise failure


def _disk_failed(adapter_id: str, version: str, exc: OSError) -> Unavailable:
    # A fault of this worker, not of the request: UNAVAILABLE lets the gateway retry elsewhere.
    what = AdapterKey(adapter_id, version).name
    return Unavailable(f"adapter {what}: this worker's adapter cache disk failed: {exc}")
