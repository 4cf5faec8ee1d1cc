"""Resolving "latest" (an empty AdapterRef.version) through the store's `Get`, remembered for a TTL.

A source URI in place of an id (`hf://org/repo@rev`) resolves through the store's `Import` instead, once:
the import made an immutable version, which later requests reuse without asking again.

Hot requests for the latest version must not each cost a store round trip; concurrent resolutions
of one id share one `Get`; and while the store is down an expired answer is still served, since
versions are immutable: it names a real adapter, just maybe not the newest one.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from services.common.errors import InvalidArgument, Unavailable
from services.inference.adapter_cache.key import is_source_uri
from services.inference.adapter_cache.store import StoreFetcher

MAX_REMEMBERED = 65536  # beyond, the least recently resolved ids are forgotten


@dataclass(frozen=True)
class Latest:
    adapter_id: str  # the store id the version belongs to (for a source URI, the id it was imported as)
    version: str
    digest: str
    resolved_at: float  # time.monotonic()


class LatestVersions:
    def __init__(self, fetcher: StoreFetcher, ttl_s: float, import_schemes: tuple[str, ...] = ()) -> None:
        self.fetcher = fetcher
        self.ttl_s = ttl_s
        self.import_schemes = import_schemes
        self.stale_answers = 0  # answered from an expired resolution while the store was down
        self._known: OrderedDict[str, Latest] = OrderedDict()
        self._resolving: dict[str, asyncio.Task[Latest]] = {}

    def fresh(self, adapter_id: str) -> Latest | None:
        """The resolution if still within its TTL; no store call (safe from any thread)."""
        known = self._known.get(adapter_id)
        if known is None or not self._is_fresh(adapter_id, known):
            return None
        return known

    def _is_fresh(self, adapter_id: str, known: Latest) -> bool:
        return is_source_uri(adapter_id) or time.monotonic() - known.resolved_at < self.ttl_s

    async def resolve(self, adapter_id: str) -> Latest:
        known = self._known.get(adapter_id)
        if known is not None and self._is_fresh(adapter_id, known):
            return known
        task = self._resolving.get(adapter_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(adapter_id))
            self._resolving[adapter_id] = task
            task.add_done_callback(lambda done: self._resolved(adapter_id, done))
        try:
            return await asyncio.shield(task)
        except Unavailable:
            if known is None:
                raise
            self.stale_answers += 1
            return known

    def in_flight(self) -> list[asyncio.Task[Latest]]:
        return list(self._resolving.values())

    def _resolved(self, adapter_id: str, done: asyncio.Task[Latest]) -> None:
        self._resolving.pop(adapter_id, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have given up already

    async def _ask(self, adapter_id: str) -> Latest:
        if is_source_uri(adapter_id):
            scheme = adapter_id.split("://", 1)[0]
            if scheme not in self.import_schemes:
                raise InvalidArgument(
                    "adapter.id",
                    f"source URIs with scheme {scheme!r} are not enabled on this worker "
                    f"(enabled: {', '.join(self.import_schemes) or 'none'})",
                )
            info = await self.fetcher.import_uri(adapter_id)
        else:
            info = await self.fetcher.info(adapter_id)
        latest = Latest(info.id, info.version, info.digest, time.monotonic())
        self._known[adapter_id] = latest
        self._known.move_to_end(adapter_id)
        while len(self._known) > MAX_REMEMBERED:
            self._known.popitem(last=False)
        return latest
