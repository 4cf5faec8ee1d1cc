"""10,000 random adapter swaps through a small slot pool leave resident memory flat."""

from __future__ import annotations

import contextlib
import gc
import random
from pathlib import Path

import pytest
import torch

from services.inference.engine.lora.pool import LoRAPool
from services.inference.engine.lora.slots import NoFreeSlot


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.slow
def test_ten_thousand_swaps_keep_memory_flat(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pool = LoRAPool(model, num_slots=4, r_max=16)
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    shapes = {name: (layer.base.in_features, layer.base.out_features) for name, layer in pool.layers.items()}
    adapters = []
    for _ in range(30):  # 30 adapters of mixed ranks and targets over 4 slots: constant eviction
        rank = rng.choice([4, 8, 16])
        names = rng.sample(sorted(shapes), k=rng.randint(2, len(shapes)))
        adapters.append(
            (
                {
                    n: (
                        torch.randn(rank, shapes[n][0], generator=g),
                        torch.randn(shapes[n][1], rank, generator=g),
                    )
                    for n in names
                },
                rank,
            )
        )
    pinned: list[str] = []

    def swap(i: int) -> None:
        key = f"a{rng.randrange(30)}"
        weights, rank = adapters[int(key[1:])]
        with contextlib.suppress(NoFreeSlot):
            pool.load(key, weights, rank, 2.0)
        if rng.random() < 0.2 and pool.table.slot_of(key) is not None and len(pinned) < 3:
            pool.table.pin(key)
            pinned.append(key)
        elif pinned and rng.random() < 0.3:
            pool.table.unpin(pinned.pop(0))

    for i in range(1000):  # warm-up: allocator pools and caches settle
        swap(i)
    gc.collect()
    before = rss_bytes()
    for i in range(10_000):
        swap(i)
    gc.collect()
    growth = (rss_bytes() - before) / before
    assert growth < 0.05, f"resident memory grew {growth:.1%}"
    for key in pool.table.resident_keys():  # every resident slot still holds exactly its adapter
        slot = pool.table.slot_of(key)
        weights, rank = adapters[int(str(key)[1:])]
        for name, layer in pool.layers.items():
            if name in weights:
                assert torch.equal(layer.lora_a[slot, :rank], weights[name][0])
                assert not layer.lora_a[slot, rank:].any()
            else:
                assert not layer.lora_a[slot].any() and not layer.lora_b[slot].any()
