"""Counters of the adapter cache, read by `AdapterCache.stats()` (and by the metrics exporter later)."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

TIERS = ("disk", "store", "mix")  # where a host miss was loaded from (a mix is built from host RAM)


@dataclass
class Counters:
    """Mutated on the event loop thread only."""

    samples: int
    host_hits: int = 0
    host_misses: int = 0
    disk_hits: int = 0
    disk_misses: int = 0
    joined_loads: int = 0  # host misses that waited on a load already in flight (deduplicated)
    corrupt_downloads: int = 0
    corrupt_disk_entries: int = 0
    failed_loads: int = 0
    load_seconds: dict[str, deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.load_seconds = {tier: deque(maxlen=self.samples) for tier in TIERS}


@dataclass(frozen=True)
class CacheStats:
    host_hits: int
    host_misses: int
    disk_hits: int
    disk_misses: int
    store_gets: int  # Get calls (version resolution)
    store_downloads: int  # Download calls, retries included
    store_imports: int  # Import calls (source URIs named as adapter ids, first use)
    joined_loads: int
    corrupt_downloads: int
    corrupt_disk_entries: int
    failed_loads: int
    stale_latest: int  # "latest" answered from an expired resolution while the store was down
    host_evictions: int
    disk_evictions: int
    host_bytes: int
    disk_bytes: int
    host_entries: int
    disk_entries: int
    pinned: dict[str, int]  # key -> pin count
    loading: int  # loads in flight
    load_seconds: dict[str, tuple[float, ...]]  # tier -> recent load times, oldest first

    def load_p50_s(self, tier: str) -> float | None:
        samples = self.load_seconds.get(tier, ())
        return statistics.median(samples) if samples else None
