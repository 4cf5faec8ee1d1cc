"""Readers on other threads and tasks never see engine or cache state while it changes: /metrics
scraped (Prometheus' own thread) and ListModels called in a loop, all through 10,000 LoRA slot swaps,
answer every time and never fail."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from openlora.v1 import inference_pb2

from tests.integration.inference.cache_kit import small_adapter, start_store
from tests.integration.worker.kit import WorkerUnderTest, collect, request, worker_settings
from tests.kit.waits import wait_until

SWAPS = 10_000
ADAPTERS = 12
CONCURRENCY = 12  # one in flight per adapter: each step's batch wants more adapters than slots


@pytest.mark.slow
@pytest.mark.timeout(900)  # a few minutes on a busy 2-core machine; the count, not the clock, ends it
async def test_metrics_and_list_models_through_ten_thousand_slot_swaps(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    store = await start_store(tmp_path / "store", tiny_llama_dir)
    for i in range(ADAPTERS):
        await store.upload(
            small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i, rank=2 + 2 * (i % 3)), f"s{i}"
        )
    settings = worker_settings(
        tmp_path, tiny_llama_dir, store_address=f"127.0.0.1:{store.server.port}", lora_slots=2
    )
    served = await WorkerUnderTest.start(settings)
    engine = served.worker.engine
    assert engine is not None
    done = threading.Event()
    scrapes: list[int] = []
    scrape_errors: list[BaseException] = []

    def scrape() -> None:  # as Prometheus does: from a thread of its own, as often as it can
        url = f"http://127.0.0.1:{served.worker.metrics_port}/metrics"
        while not done.is_set():
            try:
                with urllib.request.urlopen(url, timeout=30) as reply:
                    text = reply.read().decode()
                assert "openlora_lora_slots{" in text and "openlora_adapter_cache_hits_total{" in text
                scrapes.append(len(text))
            except BaseException as exc:
                scrape_errors.append(exc)
                return

    async def list_models() -> int:
        calls = 0
        while not done.is_set():
            reply = await served.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30)
            assert len(reply.adapters) <= ADAPTERS and reply.stats.kv_blocks_total > 0
            calls += 1
            await asyncio.sleep(0)
        return calls

    async def churn(lane: int) -> int:
        sent = 0
        while not done.is_set():
            adapter = f"s{(lane + sent) % ADAPTERS}"
            streamed = await collect(served.stub, request([3, 4, 5], adapter=adapter, max_new_tokens=1))
            assert streamed.completion_tokens == 1
            sent += 1
        return sent

    async def watch() -> None:  # the slot state the engine process publishes each step counts swaps
        try:
            await wait_until(lambda: engine.slots.evictions >= SWAPS, 840, f"{SWAPS} slot swaps")
        finally:
            done.set()

    scraper = threading.Thread(target=scrape)
    started = time.monotonic()
    scraper.start()
    try:
        watcher = asyncio.ensure_future(watch())
        list_calls, *sent = await asyncio.gather(list_models(), *(churn(lane) for lane in range(CONCURRENCY)))
        await watcher
    finally:
        done.set()
        await asyncio.to_thread(scraper.join, 60)
        await served.stop()
        await store.stop()
    elapsed = time.monotonic() - started
    print(
        f"{engine.slots.evictions} swaps, {sum(sent)} requests, {list_calls} ListModels, "
        f"{len(scrapes)} scrapes in {elapsed:.0f} s"
    )
    assert not scrape_errors, scrape_errors[0]
    assert engine.slots.evictions >= SWAPS
    assert list_calls > 0 and len(scrapes) > 0
