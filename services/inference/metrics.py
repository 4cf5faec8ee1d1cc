"""Prometheus metrics of a worker's adapter cache and LoRA slots.

Counters and sizes are read from the cache and the slot pool when Prometheus scrapes (a collector), so
the hot paths keep plain integer counters; load times go into a real histogram as loads finish.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.inference.adapter_cache import AdapterCache
from services.inference.engine.lora.pool import LoRAPool

LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AdapterMetrics(Collector):
    def __init__(self, cache: AdapterCache, pool: LoRAPool | None, registry: CollectorRegistry) -> None:
        self.cache = cache
        self.pool = pool
        self.load_seconds = Histogram(
            "openlora_adapter_load_seconds",
            "Time from a cache miss to the adapter being in host RAM, by the tier it came from.",
            ["source"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        cache.on_load_time = lambda tier, seconds: self.load_seconds.labels(tier).observe(seconds)
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        s = self.cache.stats()
        hits = CounterMetricFamily(
            "openlora_adapter_cache_hits", "Adapter lookups served by a tier.", labels=["tier"]
        )
        hits.add_metric(["host"], s.host_hits)
        hits.add_metric(["disk"], s.disk_hits)
        yield hits
        misses = CounterMetricFamily(
            "openlora_adapter_cache_misses", "Adapter lookups a tier could not serve.", labels=["tier"]
        )
        misses.add_metric(["host"], s.host_misses)
        misses.add_metric(["disk"], s.disk_misses)
        yield misses
        store = CounterMetricFamily(
            "openlora_adapter_store_calls", "Calls to the adapter store.", labels=["rpc"]
        )
        for rpc, count in (
            ("Get", s.store_gets),
            ("Download", s.store_downloads),
            ("Import", s.store_imports),
        ):
            store.add_metric([rpc], count)
        yield store
        evictions = CounterMetricFamily(
            "openlora_adapter_evictions", "Adapters evicted, by tier.", labels=["tier"]
        )
        evictions.add_metric(["host"], s.host_evictions)
        evictions.add_metric(["disk"], s.disk_evictions)
        if self.pool is not None:
            evictions.add_metric(["device"], self.pool.table.evictions)
        yield evictions
        failures = CounterMetricFamily(
            "openlora_adapter_load_failures", "Adapter loads that failed.", labels=["reason"]
        )
        failures.add_metric(["corrupt_download"], s.corrupt_downloads)
        failures.add_metric(["corrupt_disk_entry"], s.corrupt_disk_entries)
        failures.add_metric(["failed"], s.failed_loads)
        yield failures
        size = GaugeMetricFamily(
            "openlora_adapter_cache_bytes", "Bytes held by a cache tier.", labels=["tier"]
        )
        size.add_metric(["host"], s.host_bytes)
        size.add_metric(["disk"], s.disk_bytes)
        yield size
        entries = GaugeMetricFamily(
            "openlora_adapter_cache_entries", "Adapters held by a tier.", labels=["tier"]
        )
        entries.add_metric(["host"], s.host_entries)
        entries.add_metric(["disk"], s.disk_entries)
        yield entries
        yield GaugeMetricFamily(
            "openlora_adapter_loads_in_flight", "Adapter loads in progress.", value=s.loading
        )
        if self.pool is not None:
            slots = GaugeMetricFamily("openlora_lora_slots", "Device LoRA slots by state.", labels=["state"])
            used = len(self.pool.table.resident_keys())
            pinned = sum(1 for k in self.pool.table.resident_keys() if self.pool.table.is_pinned(k))
            slots.add_metric(["pinned"], pinned)
            slots.add_metric(["resident"], used - pinned)
            slots.add_metric(["free"], self.pool.table.num_free)
            yield slots
