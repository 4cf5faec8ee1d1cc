"""The reward feed: filters per subscriber, and cuts off one that falls behind instead of buffering."""

from __future__ import annotations

import asyncio

import pytest

from services.attribution.domain import RewardEntry, Role
from services.attribution.feed import RewardFeed
from services.common.errors import ResourceExhausted


def entry(contributor: str, adapter: str, picos: int = 1) -> RewardEntry:
    return RewardEntry(contributor, Role.DATA, adapter, "v1", "acme", "req", 0, 1_000_000, picos, 0)


async def test_subscribers_get_only_matching_entries_in_order() -> None:
    feed = RewardFeed(queue_size=10)
    with feed.subscribe(contributor_id="alice") as alice, feed.subscribe(adapter_id="beta") as beta:
        feed.publish([entry("alice", "alpha", 1), entry("bob", "beta", 2), entry("alice", "beta", 3)])
        assert [(await alice.next()).amount_picos for _ in range(2)] == [1, 3]
        assert [(await beta.next()).amount_picos for _ in range(2)] == [2, 3]
        assert feed.subscriber_count == 2
    assert feed.subscriber_count == 0


async def test_slow_subscriber_is_cut_off_after_what_it_had() -> None:
    feed = RewardFeed(queue_size=2)
    with feed.subscribe() as slow:
        feed.publish([entry("a", "x", n) for n in range(5)])
        assert [(await slow.next()).amount_picos for _ in range(2)] == [0, 1]
        with pytest.raises(ResourceExhausted):
            await slow.next()


async def test_waiting_subscriber_wakes_on_publish() -> None:
    feed = RewardFeed(queue_size=2)
    with feed.subscribe() as subscription:
        waiting = asyncio.create_task(subscription.next())
        await asyncio.sleep(0)
        feed.publish([entry("a", "x", 42)])
        assert (await asyncio.wait_for(waiting, 1)).amount_picos == 42
