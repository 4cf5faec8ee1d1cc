"""The host RAM tier: parsed adapters under a byte budget, least recently used evicted first.

Thread-safe: lookups and pins may come from any thread while the event loop inserts freshly loaded
ones. A pinned adapter is never evicted, even when the pins alone exceed the budget; the tier then
runs over budget until an unpin lets it shrink back.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict

from services.inference.adapter_cache.loaded import LoadedAdapter


class HostTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self._bytes = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def lookup(self, key: str) -> LoadedAdapter | None:
        """The adapter if resident, marked most recently used."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
            return adapter

    def insert(self, adapter: LoadedAdapter) -> list[str]:
        """Make `adapter` resident (most recently used); return the keys evicted to make room.

        The new adapter itself is never the victim: it was loaded because a request needs it now.
        """
        with self._lock:
            key = adapter.key
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size_bytes
            self._entries[key] = adapter
            self._bytes += adapter.size_bytes
            return self._evict_over_budget(keep=key)

    def pin(self, key: str) -> LoadedAdapter | None:
        """Protect a resident adapter from eviction (counted: pin twice, unpin twice).

        Returns None, pinning nothing, when the adapter is not resident; lookup and pin are one step,
        so an adapter cannot be evicted between the engine seeing it and pinning it.
        """
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is None:
                return None
            self._entries.move_to_end(key)
            self._pins[key] += 1
            return adapter

    def unpin(self, key: str) -> list[str]:
        """Drop one pin; once unpinned, the tier shrinks back under budget. Returns evicted keys."""
        with self._lock:
            if self._pins[key] <= 0:
                del self._pins[key]
                raise KeyError(f"adapter {key} is not pinned")
            self._pins[key] -= 1
            if self._pins[key] == 0:
                del self._pins[key]
            return self._evict_over_budget(keep=None)

    def pinned(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pins)

    def keys(self) -> list[str]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def adapters(self) -> list[LoadedAdapter]:
        """Resident adapters, least recently used first (a listing: not a use, the order is kept)."""
        with self._lock:
            return list(self._entries.values())

    def _evict_over_budget(self, keep: str | None) -> list[str]:
        evicted: list[str] = []
        if self._bytes <= self.budget_bytes:
            return evicted
        for key in list(self._entries):  # oldest first
            if self._bytes <= self.budget_bytes:
                break
            if key == keep or self._pins.get(key, 0) > 0:
                continue
            self._bytes -= self._entries.pop(key).size_bytes
            evicted.append(key)
        self.evictions += len(evicted)
        return evicted
