from __future__ import annotations

import random

import pytest

from services.inference.engine.lora.slots import NoFreeSlot, SlotTable


def test_free_slots_first_then_least_recently_used() -> None:
    table = SlotTable(2)
    assert table.acquire("a").slot == 0 and table.acquire("b").slot == 1
    again = table.acquire("a")  # hit: no load, and "a" becomes most recent
    assert (again.slot, again.needs_load, again.evicted) == (0, False, None)
    c = table.acquire("c")
    assert (c.slot, c.needs_load, c.evicted) == (1, True, "b")
    assert table.slot_of("b") is None and table.slot_of("c") == 1


def test_pinned_adapters_are_never_evicted() -> None:
    table = SlotTable(2)
    table.acquire("a")
    table.acquire("b")
    table.pin("a")
    table.pin("a")
    assert table.acquire("c").evicted == "b"
    table.pin("c")
    with pytest.raises(NoFreeSlot):
        table.acquire("d")
    table.unpin("a")
    assert table.is_pinned("a")  # pinned twice, unpinned once
    table.unpin("a")
    assert table.acquire("d").evicted == "a"
    with pytest.raises(ValueError, match="pinned"):
        table.release("c")
    with pytest.raises(KeyError):
        table.unpin("a")


def test_room_is_a_free_slot_or_an_unpinned_one() -> None:
    table = SlotTable(2)
    table.acquire("a")
    table.pin("a")
    assert table.has_room  # a free slot
    table.acquire("b")
    assert table.has_room  # "b" may be evicted
    table.pin("b")
    table.pin("b")
    assert not table.has_room
    table.unpin("b")
    assert not table.has_room  # still pinned once
    table.unpin("b")
    assert table.has_room
    table.unpin("a")
    table.release("a")
    assert table.has_room and table.num_free == 1


def test_random_churn_keeps_the_table_consistent() -> None:
    rng = random.Random(0)
    table = SlotTable(4)
    pinned: dict[str, int] = {}
    for _ in range(10_000):
        key = f"k{rng.randrange(12)}"
        action = rng.random()
        if action < 0.6:
            room = table.has_room or table.slot_of(key) is not None
            try:
                table.acquire(key)
                assert room
            except NoFreeSlot:
                assert len(pinned) == 4 and not room
        elif action < 0.8 and table.slot_of(key) is not None:
            table.pin(key)
            pinned[key] = pinned.get(key, 0) + 1
        elif pinned.get(key):
            table.unpin(key)
            pinned[key] -= 1
            if not pinned[key]:
                del pinned[key]
        elif table.slot_of(key) is not None and key not in pinned:
            table.release(key)
        slots = [table.slot_of(k) for k in table.resident_keys()]
        assert len(set(slots)) == len(slots) and len(slots) + table.num_free == 4
        assert all(table.slot_of(k) is not None for k in pinned)
