"""Which adapter sits in which device slot. Plain Python: no torch, so it is tested exhaustively.

Adapter identity is not a slot: the engine asks for a key's slot, gets a free one or the least
recently used slot whose adapter no running request needs, and only slot indices reach the kernels.
`EMPTY` marks "no adapter" (base model) in per-token slot lists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

EMPTY = -1


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter the running batch uses."""


@dataclass(frozen=True)
class Acquired:
    slot: int
    needs_load: bool  # the slot was free or evicted: the caller must write the adapter's weights
    evicted: Hashable | None  # key whose slot was taken over, if any


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.num_slots = num_slots
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # least recently used first
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._pins: dict[Hashable, int] = {}
        self.evictions = 0  # adapters pushed out of their slot to make room for another

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def resident_keys(self) -> list[Hashable]:
        return list(self._slot_of)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def has_room(self) -> bool:
        """A key without a slot could get one now: a slot is free, or one holds an unpinned key."""
        return bool(self._free) or len(self._pins) < len(self._slot_of)  # only resident keys are pinned

    def acquire(self, key: Hashable) -> Acquired:
        """The key's slot, assigning one (free first, else evicting the LRU unpinned key) if needed."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            return Acquired(slot, needs_load=False, evicted=None)
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in self._slot_of if k not in self._pins), None)
            if victim is None:
                raise NoFreeSlot(f"all {self.num_slots} adapter slots are used by the running batch")
            slot = self._slot_of.pop(victim)
            evicted = victim
            self.evictions += 1
        self._slot_of[key] = slot
        return Acquired(slot, needs_load=True, evicted=evicted)

    def pin(self, key: Hashable) -> None:
        """Protect a key from eviction while a running request uses it (counted)."""
        if key not in self._slot_of:
            raise KeyError(f"{key!r} holds no slot")
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        count = self._pins.get(key, 0)
        if count <= 0:
            raise KeyError(f"{key!r} is not pinned")
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1

    def is_pinned(self, key: Hashable) -> bool:
        return key in self._pins

    def release(self, key: Hashable) -> int:
        """Free the key's slot (it must not be pinned); return the slot so its weights can be zeroed."""
        if key in self._pins:
            raise ValueError(f"{key!r} is pinned by a running request")
        slot = self._slot_of.pop(key)
        self._free.append(slot)
        return slot
