"""In-process fan-out of committed reward entries to `WatchRewards` subscribers.

Entries are published right after their transaction commits, on the event loop, so a subscriber
sees them within one loop turn. Each subscriber has a bounded queue: one that falls behind is cut
off (RESOURCE_EXHAUSTED) instead of making ingest wait or buffering without limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from services.attribution.domain import RewardEntry
from services.common.errors import ResourceExhausted, ServiceError, Unavailable


class Subscription:
    def __init__(self, contributor_id: str, adapter_id: str, queue_size: int) -> None:
        self.contributor_id = contributor_id
        self.adapter_id = adapter_id
        # Bounded by `offer`, not by the queue itself, so the final error always fits.
        self._queue: asyncio.Queue[RewardEntry | ServiceError] = asyncio.Queue()
        self._queue_size = queue_size
        self._cut_off = False

    def wants(self, entry: RewardEntry) -> bool:
        return (not self.contributor_id or entry.contributor_id == self.contributor_id) and (
            not self.adapter_id or entry.adapter_id == self.adapter_id
        )

    def offer(self, entry: RewardEntry) -> None:
        if self._cut_off:
            return
        if self._queue.qsize() >= self._queue_size:
            self.end(ResourceExhausted("reward feed subscriber fell behind; resubscribe", retry_after_s=1.0))
            return
        self._queue.put_nowait(entry)

    def end(self, error: ServiceError) -> None:
        """Deliver `error` after what is already queued, and nothing more."""
        if not self._cut_off:
            self._cut_off = True
            self._queue.put_nowait(error)

    async def next(self) -> RewardEntry:
        entry = await self._queue.get()
        if isinstance(entry, ServiceError):
            raise entry
        return entry


class RewardFeed:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subscriptions: set[Subscription] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    @contextmanager
    def subscribe(self, contributor_id: str = "", adapter_id: str = "") -> Iterator[Subscription]:
        subscription = Subscription(contributor_id, adapter_id, self.queue_size)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def close(self) -> None:
        """End every subscription with UNAVAILABLE (the server is draining): feeds never end by
        themselves, and a graceful shutdown would otherwise wait its whole grace period for them."""
        for subscription in self._subscriptions:
            subscription.end(Unavailable("server shutting down; resubscribe", retry_after_s=0.5))

    def publish(self, entries: Iterable[RewardEntry]) -> None:
        """Offer committed entries to every matching subscriber (call on the event loop)."""
        if not self._subscriptions:
            return
        for entry in entries:
            for subscription in self._subscriptions:
                if subscription.wants(entry):
                    subscription.offer(entry)
