"""Admission, pinning and segment ordering of adapters between the scheduler and the slot pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.inference.engine.lora.pool import LoRAPool
from services.inference.engine.lora.residency import AdapterResidency
from services.inference.engine.lora.slots import EMPTY
from services.inference.engine.scheduler import ScheduledChunk
from services.inference.engine.sequence import Sequence


class HostAdapter:
    """An adapter in host RAM, as the adapter cache hands it over (random q/v weights)."""

    def __init__(self, pool: LoRAPool, seed: int, rank: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rank, self.scaling = rank, 2.0
        self.weights = {
            name: (
                torch.randn(rank, layer.base.in_features, generator=g),
                torch.randn(layer.base.out_features, rank, generator=g),
            )
            for name, layer in pool.layers.items()
            if name.endswith(("q_proj", "v_proj"))
        }


@pytest.fixture
def pool(tiny_llama_dir: Path) -> LoRAPool:
    from transformers import AutoModelForCausalLM

    return LoRAPool(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), num_slots=1, r_max=8)


def seq(key: str | None, n: int = 3) -> Sequence:
    return Sequence(f"r-{key}-{n}", list(range(3, 3 + n)), adapter_key=key)


def test_admission_loads_pins_and_defers(pool: LoRAPool) -> None:
    host: dict[str, HostAdapter] = {"a": HostAdapter(pool, 1)}
    requested: list[str] = []
    residency = AdapterResidency(pool, host.get, requested.append)

    assert residency.adapter_ready(seq(None))  # the base model is always ready
    assert not residency.adapter_ready(seq("b"))  # in no tier yet: a load is requested
    assert requested == ["b"]
    a = seq("a")
    assert residency.adapter_ready(a) and pool.table.is_pinned("a")
    host["b"] = HostAdapter(pool, 2)
    assert not residency.adapter_ready(seq("b"))  # the only slot serves the running "a"
    residency.sync([a])
    assert pool.table.is_pinned("a")
    residency.sync([])  # "a" finished: its slot may go
    assert not pool.table.is_pinned("a")
    assert residency.adapter_ready(seq("b")) and pool.table.slot_of("a") is None


def test_no_adapter_is_looked_up_while_every_slot_serves_the_batch(pool: LoRAPool) -> None:
    host = {"a": HostAdapter(pool, 1), "b": HostAdapter(pool, 2)}
    looked_up: list[str] = []

    def lookup(key: str) -> HostAdapter | None:
        looked_up.append(key)  # in the engine process: a handoff file mapped and parsed
        return host.get(key)

    residency = AdapterResidency(pool, lookup, lambda key: None)
    a = seq("a")
    assert residency.adapter_ready(a)
    residency.sync([a])
    for _ in range(3):  # scheduling passes while "a" runs in the only slot
        assert not residency.adapter_ready(seq("b"))
    assert looked_up == ["a"]
    residency.sync([])
    assert residency.adapter_ready(seq("b")) and looked_up == ["a", "b"]


def test_sync_pins_once_per_running_sequence(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    pool = LoRAPool(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), num_slots=2, r_max=8)
    host = {"a": HostAdapter(pool, 1)}
    residency = AdapterResidency(pool, host.get, lambda key: None)
    first, second = seq("a", 2), seq("a", 4)
    assert residency.adapter_ready(first) and residency.adapter_ready(second)
    assert residency.adapter_ready(seq("a", 5))  # admitted, then deferred by the block manager
    residency.sync([first, second])
    pool.table.unpin("a")
    assert pool.table.is_pinned("a")  # two running sequences: one pin left after taking one off
    pool.table.unpin("a")
    assert not pool.table.is_pinned("a")


def test_step_orders_tokens_by_slot_into_segments(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    pool = LoRAPool(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), num_slots=2, r_max=8)
    host = {"a": HostAdapter(pool, 1), "b": HostAdapter(pool, 2)}
    residency = AdapterResidency(pool, host.get, lambda key: None)
    seqs = [seq("b", 3), seq(None, 2), seq("a", 4), seq("b", 1), seq(None, 5)]
    for s in seqs:
        assert residency.adapter_ready(s)
    chunks = [ScheduledChunk(s, 0, s.num_tokens, samples=True) for s in seqs]
    ordered, step = residency.step_for(chunks)
    slot_a, slot_b = residency.slot_of(seqs[2]), residency.slot_of(seqs[0])
    assert [c.seq for c in ordered] == [
        seqs[1],
        seqs[4],
        *sorted([seqs[2], seqs[0], seqs[3]], key=lambda s: (residency.slot_of(s), seqs.index(s))),
    ]
    assert step.seg_slots == [EMPTY, *sorted([slot_a, slot_b])]
    sizes = {EMPTY: 7, slot_a: 4, slot_b: 4}
    assert [step.seg_indptr[i + 1] - step.seg_indptr[i] for i in range(3)] == [
        sizes[s] for s in step.seg_slots
    ]


def test_float16_slots_refuse_an_adapter_float16_cannot_hold(tiny_llama_dir: Path) -> None:
    """`lora_dtype=model` on a float16 model: weights past 65504 would load as inf, so they are refused
    before a slot is touched."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    pool = LoRAPool(model, num_slots=1, r_max=8, dtype=torch.float16)
    adapter = HostAdapter(pool, 3)
    pool.load("fits", adapter.weights, adapter.rank, adapter.scaling)
    name = next(iter(adapter.weights))
    adapter.weights[name][1][0, 0] = 1e6
    with pytest.raises(ValueError, match="past float16's range"):
        pool.load("overflows", adapter.weights, adapter.rank, adapter.scaling)
    assert pool.table.slot_of("overflows") is None
