"""The adapter cache's tiers on their own: host LRU with pins, the content-addressed disk tier,
and parsing the store's canonical files into float32 (A, B) pairs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.inference.adapter_cache import AdapterCorrupt, CacheConfig, LoadedAdapter, parse_adapter
from services.inference.adapter_cache.disk_tier import STAGING, DiskTier
from services.inference.adapter_cache.host_tier import HostTier
from services.inference.adapter_cache.loaded import CONFIG_FILE, WEIGHTS_FILE

PATH = "model.layers.{}.self_attn.q_proj"


def adapter(name: str, size: int) -> LoadedAdapter:
    """A host entry of `size` bytes (the tier budgets by size_bytes only)."""
    a, b = torch.zeros(1, size // 8), torch.zeros(size // 8, 1)
    return LoadedAdapter(name, "v1", "0" * 64, 1, 1.0, ("q_proj",), {PATH.format(0): (a, b)}, size)


def write_canonical(
    folder: Path, *, rank: int = 4, layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0
) -> str:
    """The store's canonical pair of files; returns the weights' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed * 1000 + rank * 10 + layers)
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.{PATH.format(layer)}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 64, generator=generator).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(64, rank, generator=generator).to(dtype)
    save_file(tensors, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


# host tier


def test_host_tier_evicts_least_recently_used_and_stays_within_budget() -> None:
    host = HostTier(budget_bytes=3000)
    for name in "abc":
        assert host.insert(adapter(name, 1000)) == []
    assert host.lookup("a@v1") is not None  # a becomes most recent: b is now the oldest
    assert host.insert(adapter("d", 1000)) == ["b@v1"]
    assert host.keys() == ["c@v1", "a@v1", "d@v1"]
    assert host.bytes == 3000 and host.evictions == 1
    assert host.insert(adapter("e", 2000)) == ["c@v1", "a@v1"]
    assert host.bytes == 3000 <= host.budget_bytes


def test_pinned_adapters_survive_even_over_budget_until_unpinned() -> None:
    host = HostTier(budget_bytes=2000)
    host.insert(adapter("a", 1000))
    host.insert(adapter("b", 1000))
    assert host.pin("a@v1") is not None and host.pin("b@v1") is not None
    assert host.pin("b@v1") is not None  # counted: the batch and a second sequence both use b
    assert host.insert(adapter("c", 1000)) == []  # nothing unpinned to evict but the newcomer
    assert host.bytes == 3000 and set(host.keys()) == {"a@v1", "b@v1", "c@v1"}
    assert host.insert(adapter("d", 1000)) == ["c@v1"]  # the unpinned one goes, not the running batch
    assert host.unpin("a@v1") == ["a@v1"]  # unpinning lets the tier shrink back under budget
    assert host.bytes == 2000
    assert host.unpin("b@v1") == []  # still pinned once
    assert host.pinned() == {"b@v1": 1}
    host.unpin("b@v1")
    with pytest.raises(KeyError):
        host.unpin("b@v1")
    assert host.pin("zzz@v1") is None and host.pinned() == {}


# disk tier


def commit(disk: DiskTier, tmp: Path, key: str, layers: int, seed: int = 0) -> str:
    staged = disk.staging_dir()
    digest = write_canonical(staged, layers=layers, seed=seed)
    disk.commit(staged, digest, key)
    return digest


def test_disk_tier_is_content_addressed_and_keeps_its_budget(tmp_path: Path) -> None:
    one = write_canonical(tmp_path / "probe", layers=1)
    size = sum(f.stat().st_size for f in (tmp_path / "probe").iterdir())
    disk = DiskTier(tmp_path / "cache", budget_bytes=2 * size)  # room for two entries
    assert commit(disk, tmp_path, "x@v1", 1) == one
    assert sorted(p.name for p in disk.path(one).iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "refs.json"]
    assert disk.path(one).parent.name == one[:2]
    commit(disk, tmp_path, "y@v1", 1)  # same bytes under another name: one entry, two refs
    assert len(disk) == 1 and disk.digest_of("y@v1") == one and disk.bytes == size
    assert json.loads((disk.path(one) / "refs.json").read_text()) == ["x@v1", "y@v1"]
    two = commit(disk, tmp_path, "z@v1", 1, seed=2)
    assert disk.bytes == 2 * size and disk.evictions == 0
    assert disk.open_entry(one) is not None  # read again: `two` is now the least recently used
    disk.close_entry(one)
    three = commit(disk, tmp_path, "w@v1", 1, seed=3)
    assert disk.bytes == 2 * size <= disk.budget_bytes and disk.evictions == 1
    assert not disk.path(two).exists() and disk.digest_of("z@v1") is None
    assert disk.digest_of("x@v1") == one and disk.digest_of("w@v1") == three
    assert list((disk.root / STAGING).iterdir()) == []
    # What ListModels shows of the disk tier: every name of every entry, most recently used first.
    assert disk.entries() == [("w@v1", three, size), ("x@v1", one, size), ("y@v1", one, size)]


def test_disk_tier_survives_a_restart_in_lru_order(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "cache", budget_bytes=1 << 20)
    old = commit(disk, tmp_path, "old@v1", 1)
    new = commit(disk, tmp_path, "new@v1", 2)
    past = time.time() - 100
    os.utime(disk.path(old), (past, past))
    os.utime(disk.path(new), (past + 50, past + 50))
    assert disk.open_entry(old) is not None  # reading refreshes recency on disk too
    disk.close_entry(old)
    (disk.root / STAGING / "leftover").mkdir()
    broken = disk.root / "ab" / ("ab" + "0" * 62)
    broken.mkdir(parents=True)
    (broken / CONFIG_FILE).write_text("{}")  # no weights: a crash mid-way

    again = DiskTier(tmp_path / "cache", budget_bytes=disk.bytes)
    again.scan()
    assert again.digest_of("old@v1") == old and again.digest_of("new@v1") == new
    assert again.bytes == disk.bytes and not broken.exists()
    assert not (again.root / STAGING).exists()
    smaller = DiskTier(tmp_path / "cache", budget_bytes=disk.bytes - 1)
    smaller.scan()  # a smaller budget at start evicts the least recently used: new (old was read)
    assert smaller.digest_of("old@v1") == old and smaller.digest_of("new@v1") is None


def test_disk_tier_never_evicts_an_entry_being_read(tmp_path: Path) -> None:
    probe = write_canonical(tmp_path / "probe", layers=1)
    size = sum(f.stat().st_size for f in (tmp_path / "probe").iterdir())
    disk = DiskTier(tmp_path / "cache", budget_bytes=size)  # room for one small entry
    assert commit(disk, tmp_path, "a@v1", 1) == probe
    assert disk.open_entry(probe) is not None  # a worker thread is parsing it right now
    bigger = commit(disk, tmp_path, "b@v1", 2)
    assert disk.path(probe).is_dir() and disk.digest_of("a@v1") == probe
    assert not disk.path(bigger).exists()  # the reader's entry stayed; the unread one went
    assert disk.bytes <= disk.budget_bytes
    disk.close_entry(probe)
    third = commit(disk, tmp_path, "c@v1", 3)  # bigger than the budget on its own: kept nowhere
    assert not disk.path(third).exists() and not disk.path(probe).exists() and disk.bytes == 0


# parsing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parse_gives_float32_pairs_keyed_by_module_path(tmp_path: Path, dtype: torch.dtype) -> None:
    digest = write_canonical(tmp_path, rank=4, layers=2, dtype=dtype)
    loaded = parse_adapter("acme/poet", "v1", digest, tmp_path, pin_memory=False)
    assert (loaded.rank, loaded.alpha, loaded.scaling, loaded.key) == (4, 8.0, 2.0, "acme/poet@v1")
    assert list(loaded.weights) == [PATH.format(0), PATH.format(1)]
    assert loaded.target_modules == ("q_proj",)
    lora_a, lora_b = loaded.weights[PATH.format(1)]
    assert lora_a.shape == (4, 64) and lora_b.shape == (64, 4) and lora_a.dtype == torch.float32
    assert loaded.size_bytes == 2 * 2 * 4 * 64 * 4


def test_parse_refuses_bytes_that_do_not_match_the_digest(tmp_path: Path) -> None:
    digest = write_canonical(tmp_path)
    with pytest.raises(AdapterCorrupt, match="expected"):
        parse_adapter("a", "v1", "f" * 64, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"r": 8, "lora_alpha": 16}))  # rank 8, tensors rank 4
    with pytest.raises(AdapterCorrupt, match=r"not \[8, d_in\]") as refused:
        parse_adapter("a", "v1", digest, tmp_path)
    assert refused.value.code.name == "DATA_LOSS"


def test_config_checks_its_fields() -> None:
    assert CacheConfig(host_bytes=1, disk_bytes=1).latest_ttl_s == 5.0
    for bad in ({"host_bytes": 0}, {"latest_ttl_s": -1.0}, {"download_attempts": 0}):
        with pytest.raises(ValueError):
            CacheConfig(**bad)
