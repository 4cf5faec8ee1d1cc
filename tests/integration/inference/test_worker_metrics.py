"""The worker's adapter metrics, scraped in Prometheus text format after real cache and slot activity."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.inference.engine.lora.pool import LoRAPool
from services.inference.metrics import AdapterMetrics
from tests.integration.inference.cache_kit import open_cache, small_adapter, start_store


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_follow_cache_and_slots(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    store = await start_store(tmp_path / "store", tiny_llama_dir)
    cache = await open_cache(store, tmp_path / "cache")
    pool = LoRAPool(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), num_slots=1, r_max=8)
    registry = CollectorRegistry()
    AdapterMetrics(cache, lambda: pool.table, registry)
    try:
        for i in range(2):
            await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i), f"a{i}")
        for name in ("a0", "a0", "a1"):  # a miss, a host hit, another miss
            adapter = (await cache.get(name)).adapter
            pool.load(adapter.key, adapter.weights, adapter.rank, adapter.scaling)  # a1 evicts a0's slot
        got = samples(registry)
    finally:
        await cache.close()
        await store.stop()
    assert got[("openlora_adapter_cache_hits_total", (("tier", "host"),))] == 1
    assert got[("openlora_adapter_cache_misses_total", (("tier", "host"),))] == 2
    assert got[("openlora_adapter_store_calls_total", (("rpc", "Download"),))] == 2
    assert got[("openlora_adapter_evictions_total", (("tier", "device"),))] == 1
    assert got[("openlora_lora_slots", (("state", "resident"),))] == 1
    assert got[("openlora_lora_slots", (("state", "free"),))] == 0
    assert got[("openlora_adapter_load_seconds_count", (("source", "store"),))] == 2
    assert got[("openlora_adapter_cache_entries", (("tier", "host"),))] == 2
