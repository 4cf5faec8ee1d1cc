"""Prometheus metrics of a worker's adapter cache and LoRA slots.

Counters and sizes are read from the cache (a snapshot taken on its event loop) and from the slot state
the engine process last published when Prometheus scrapes (a collector), so the hot paths keep plain
integer counters; load times go into a real histogram as loads finish (the cache's observer).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.inference.adapter_cache import AdapterCache, LoadedAdapter


class SlotView(Protocol):
    """What the metrics read of the LoRA slots: a `SlotTable`, or the engine process's last report."""

    @property
    def evictions(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def resident_keys(self) -> Sequence[Hashable]: ...

    def is_pinned(self, key: Hashable) -> bool: ...


LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AdapterMetrics(Collector):
    def __init__(
        self, cache: AdapterCache, slots: Callable[[], SlotView | None] | None, registry: CollectorRegistry
    ) -> None:
        self.cache = cache
        self.slots = slots
        self.load_seconds = Histogram(
            "openlora_adapter_load_seconds",
            "Time from a cache miss to the adapter being in host RAM, by the tier it came from.",
            ["source"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        cache.observe(self)
        registry.register(self)

    def adapter_loaded(self, adapter: LoadedAdapter, tier: str, seconds: float) -> None:
        self.load_seconds.labels(tier).observe(seconds)

    def collect(self) -> Iterator[Metric]:
        # Prometheus scrapes from a thread of its own: the cache's counters are read on its loop.
        s = self.cache.snapshot()
        if s is None:
            return
        yield _family(
            CounterMetricFamily,
            "openlora_adapter_cache_hits",
            "Adapter lookups served by a tier.",
            "tier",
            {"host": s.host_hits, "disk": s.disk_hits},
        )
        yield _family(
            CounterMetricFamily,
            "openlora_adapter_cache_misses",
            "Adapter lookups a tier could not serve.",
            "tier",
            {"host": s.host_misses, "disk": s.disk_misses},
        )
        yield _family(
            CounterMetricFamily,
            "openlora_adapter_store_calls",
            "Calls to the adapter store.",
            "rpc",
            {"Get": s.store_gets, "Download": s.store_downloads, "Import": s.store_imports},
        )
        evictions = {"host": s.host_evictions, "disk": s.disk_evictions}
        table = self.slots() if self.slots is not None else None
        if table is not None:
            evictions["device"] = table.evictions
        yield _family(
            CounterMetricFamily, "openlora_adapter_evictions", "Adapters evicted, by tier.", "tier", evictions
        )
        yield _family(
            CounterMetricFamily,
            "openlora_adapter_load_failures",
            "Adapter loads that failed.",
            "reason",
            {
                "corrupt_download": s.corrupt_downloads,
                "corrupt_disk_entry": s.corrupt_disk_entries,
                "failed": s.failed_loads,
            },
        )
        yield _family(
            GaugeMetricFamily,
            "openlora_adapter_cache_bytes",
            "Bytes held by a cache tier.",
            "tier",
            {"host": s.host_bytes, "disk": s.disk_bytes},
        )
        yield _family(
            GaugeMetricFamily,
            "openlora_adapter_cache_entries",
            "Adapters held by a tier.",
            "tier",
            {"host": s.host_entries, "disk": s.disk_entries},
        )
        yield GaugeMetricFamily(
            "openlora_adapter_loads_in_flight", "Adapter loads in progress.", value=s.loading
        )
        if table is not None:
            keys = table.resident_keys()
            pinned = sum(1 for k in keys if table.is_pinned(k))
            yield _family(
                GaugeMetricFamily,
                "openlora_lora_slots",
                "Device LoRA slots by state.",
                "state",
                {"pinned": pinned, "resident": len(keys) - pinned, "free": table.num_free},
            )


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Mapping[str, float],
) -> Metric:
    """One metric family with a sample per label value."""
    family = kind(name, doc, labels=[label])
    for value_label, value in values.items():
        family.add_metric([value_label], value)
    return family
