"""A source URI named as an adapter id is imported through the store once, then served from the cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.inference.adapter_cache import AdapterKey
from tests.integration.inference.cache_kit import open_cache, small_adapter, start_store


async def test_source_uri_is_imported_on_first_use_then_cached(tmp_path: Path, tiny_llama_dir: Path) -> None:
    sources = tmp_path / "sources"
    folder = small_adapter(tiny_llama_dir, sources / "poet", seed=5)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-llama"  # so the store can check it without being told
    (folder / "adapter_config.json").write_text(json.dumps(config))
    store = await start_store(
        tmp_path / "store", tiny_llama_dir, import_schemes=["file"], import_file_roots=[sources]
    )
    cache = await open_cache(store, tmp_path / "cache", import_schemes=("file",))
    uri = f"file://{folder}"
    try:
        first = [entry.adapter for entry in await asyncio.gather(*(cache.get(uri) for _ in range(10)))]
        assert {a.key for a in first} == {first[0].key} and first[0].id == "poet"
        assert store.servicer.calls["Import"] == 1 and store.servicer.calls["Download"] == 1
        again = (await cache.get(uri)).adapter  # hot: no store call at all
        assert again is first[0]
        assert cache.resident(uri) is first[0]
        assert store.servicer.calls["Import"] == 1 and store.servicer.calls["Download"] == 1
        assert cache.stats().store_imports == 1
    finally:
        await cache.close()
        await store.stop()


async def test_source_uris_need_the_worker_to_allow_their_scheme(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    store = await start_store(tmp_path / "store", tiny_llama_dir)
    cache = await open_cache(store, tmp_path / "cache")  # no import schemes enabled
    try:
        with pytest.raises(InvalidArgument, match="not enabled on this worker"):
            await cache.get("hf://acme/poet")
        assert store.servicer.calls["Import"] == 0
        with pytest.raises(InvalidArgument, match=r"adapter\.version"):
            await cache.get(AdapterKey("hf://acme/poet", "v1"))
    finally:
        await cache.close()
        await store.stop()
