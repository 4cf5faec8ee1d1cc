"""Ties the scheduler, the device slot pool and the host adapter cache together on the engine thread.

- `adapter_ready(seq)` is the scheduler's admission hook: a sequence whose adapter sits in a device slot
  is ready; while every slot serves the running batch, any other waits; one whose adapter is in host
  RAM is written into a slot now (evicting the least recently used slot no running request needs)
  and is ready; otherwise a background load is requested and the sequence waits in LOADING while the
  batch runs on.
- `sync(running)` pins exactly the adapters of the running sequences, after each scheduling pass, so a
  slot is never taken from a request mid-generation, and admitted-then-deferred sequences hold nothing.
- `step_for(chunks)` orders the step's sequences by slot, so each adapter's tokens are one contiguous
  segment, and returns the segments for the wrapped layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from services.inference.engine.lora.pool import LoRAPool, LoRAStep
from services.inference.engine.lora.slots import EMPTY
from services.inference.engine.scheduler import ScheduledChunk
from services.inference.engine.sequence import Sequence as Seq


class HostAdapter(Protocol):
    """What the pool needs of an adapter in host RAM (the adapter cache's LoadedAdapter)."""

    @property
    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...

    @property
    def rank(self) -> int: ...

    @property
    def scaling(self) -> float: ...


class AdapterResidency:
    def __init__(
        self,
        pool: LoRAPool,
        lookup: Callable[[str], HostAdapter | None],
        request_load: Callable[[str], None],
    ) -> None:
        self.pool = pool
        self.lookup = lookup  # non-blocking host-RAM lookup by adapter key
        self.request_load = request_load  # start a background load (any thread)
        self._pins: Counter[str] = Counter()

    def adapter_ready(self, seq: Seq) -> bool:
        key = seq.adapter_key
        if key is None or self.pool.table.slot_of(key) is not None:
            if key is not None:
                self._pin(key)  # held until the next sync(), so this pass cannot evict it
            return True
        if not self.pool.table.has_room:
            # Every slot serves the running batch: wait for one to finish. Asked again at every
            # scheduling pass, so the adapter is not looked up before it can go somewhere (in the
            # engine process a lookup maps the adapter's handoff file).
            return False
        adapter = self.lookup(key)
        if adapter is None:
            self.request_load(key)
            return False
        self.pool.load(key, adapter.weights, adapter.rank, adapter.scaling)
        self._pin(key)
        return True

    def _pin(self, key: str) -> None:
        self.pool.table.pin(key)
        self._pins[key] += 1

    def sync(self, running: Iterable[Seq]) -> None:
        """Pin exactly the adapters the running sequences use (one pin per sequence)."""
        wanted = Counter(seq.adapter_key for seq in running if seq.adapter_key is not None)
        for key in set(self._pins) | set(wanted):
            have, want = self._pins[key], wanted[key]
            for _ in range(want - have):
                self.pool.table.pin(key)
            for _ in range(have - want):
                self.pool.table.unpin(key)
            if want:
                self._pins[key] = want
            else:
                del self._pins[key]

    def slot_of(self, seq: Seq) -> int:
        if seq.adapter_key is None:
            return EMPTY
        slot = self.pool.table.slot_of(seq.adapter_key)
        if slot is None:
            raise RuntimeError(f"adapter {seq.adapter_key} of a running request holds no slot")
        return slot

    def step_for(self, chunks: Sequence[ScheduledChunk]) -> tuple[list[ScheduledChunk], LoRAStep]:
        """The chunks ordered by slot (stable: arrival order within a slot) and their token segments."""
        keyed = sorted(
            ((self.slot_of(c.seq), i, c) for i, c in enumerate(chunks)), key=lambda t: (t[0], t[1])
        )
        ordered = [c for _, _, c in keyed]
        seg_indptr: list[int] = [0]
        seg_slots: list[int] = []
        for slot, _, chunk in keyed:
            if seg_slots and seg_slots[-1] == slot:
                seg_indptr[-1] += chunk.num_new_tokens
            else:
                seg_slots.append(slot)
                seg_indptr.append(seg_indptr[-1] + chunk.num_new_tokens)
        return ordered, LoRAStep(seg_indptr, seg_slots)
