"""Rewards through a real server, on PostgreSQL and SQLite: each token's price split by mix weight,
then by contributor share, exact to the cent (and below); the live feed within a second."""

from __future__ import annotations

import time
from decimal import Decimal

import grpc
import pytest
from google.protobuf import duration_pb2
from openlora.v1 import adapter_store_pb2, attribution_pb2, attribution_pb2_grpc

from services.attribution.app import AttributionApp
from tests.integration.attribution.wire import T0, batch, provenance, register, request_tokens, ts
from tests.kit.waits import within
from tests.kit.work_clock import WorkClock

TRAINER, DATA = adapter_store_pb2.TRAINER, adapter_store_pb2.DATA
MIX = (("alpha", "v1", 0.7), ("beta", "v2", 0.3))


async def price_and_register(stub: attribution_pb2_grpc.AttributionAsyncStub) -> None:
    await stub.SetPrice(
        attribution_pb2.SetPriceRequest(adapter_id="alpha", prompt_price="0.01", completion_price="0.03")
    )
    # beta has no price of its own: the default applies.
    await stub.SetPrice(
        attribution_pb2.SetPriceRequest(adapter_id="", prompt_price="0.02", completion_price="0.05")
    )
    await stub.RegisterProvenance(
        register("alpha", "v1", provenance(("alice", TRAINER, 0.6), ("bob", DATA, 0.4)))
    )
    await stub.RegisterProvenance(
        register(
            "beta", "v2", provenance(("carol", TRAINER, 0.5), ("dave", DATA, 0.25), ("erin", DATA, 0.25))
        )
    )


async def test_mixed_request_split_by_weights_and_shares_to_the_cent(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    await price_and_register(stub)
    mixed = request_tokens("req-mix", prompt=10, completion=20, adapters=MIX)
    single = request_tokens("req-one", prompt=0, completion=5, tenant="globex", at=T0 + 120)
    ack = await stub.RecordUsage(
        iter([batch(1, mixed[:15]), batch(2, mixed[15:] + single), batch(2, single)])
    )
    assert (ack.acked_sequence, ack.inserted_records, ack.duplicate_records) == (2, 35, 5)

    # alpha earns 0.7 × (10 × 0.01 + 20 × 0.03) = 0.49 on the mix, plus 5 × 0.03 = 0.15 alone;
    # beta earns 0.3 × (10 × 0.02 + 20 × 0.05) = 0.36. Then by share.
    expected = {
        "alice": Decimal("0.384"),  # 0.6 × 0.64
        "bob": Decimal("0.256"),  # 0.4 × 0.64
        "carol": Decimal("0.18"),
        "dave": Decimal("0.09"),
        "erin": Decimal("0.09"),
    }
    for contributor, amount in expected.items():
        report = await stub.GetRewards(attribution_pb2.RewardsQuery(contributor_id=contributor))
        assert Decimal(report.total) == amount, contributor
        assert report.currency == "USD"

    everything = await stub.GetRewards(attribution_pb2.RewardsQuery())
    assert Decimal(everything.total) == Decimal("1.00")
    lines = {(line.contributor_id, line.adapter_id): line for line in everything.lines}
    assert set(lines) == {
        ("alice", "alpha"),
        ("bob", "alpha"),
        ("carol", "beta"),
        ("dave", "beta"),
        ("erin", "beta"),
    }
    assert lines["alice", "alpha"].tokens == pytest.approx(0.7 * 30 + 5)
    assert lines["carol", "beta"].tokens == pytest.approx(0.3 * 30)
    assert sum(Decimal(line.amount) for line in everything.lines) == Decimal(everything.total)

    by_adapter = await stub.GetRewards(attribution_pb2.RewardsQuery(adapter_id="beta"))
    assert Decimal(by_adapter.total) == Decimal("0.36")
    by_tenant = await stub.GetRewards(attribution_pb2.RewardsQuery(tenant="globex"))
    assert Decimal(by_tenant.total) == Decimal("0.15")

    ranged = await stub.GetRewards(
        attribution_pb2.RewardsQuery(
            contributor_id="alice", start=ts(T0), end=ts(T0 + 180), bucket=duration_pb2.Duration(seconds=60)
        )
    )
    assert [(b.start.seconds, Decimal(b.amount)) for b in ranged.buckets] == [
        (T0, Decimal("0.294")),
        (T0 + 120, Decimal("0.09")),
    ]
    later = await stub.GetRewards(attribution_pb2.RewardsQuery(contributor_id="alice", start=ts(T0 + 60)))
    assert Decimal(later.total) == Decimal("0.09")


async def test_usage_totals_and_buckets(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    records = (
        request_tokens("r1", prompt=3, completion=4, adapters=MIX, at=T0 + 5)
        + request_tokens("r2", prompt=2, completion=1, at=T0 + 65)
        + request_tokens("r3", prompt=1, completion=1, adapters=(), tenant="globex", at=T0 + 200)
    )
    await stub.RecordUsage(iter([batch(1, records)]))
    everything = await stub.GetUsage(attribution_pb2.UsageQuery(bucket=duration_pb2.Duration(seconds=120)))
    assert (everything.totals.prompt_tokens, everything.totals.completion_tokens) == (6, 6)
    assert [(b.start.seconds, b.prompt_tokens, b.completion_tokens) for b in everything.buckets] == [
        (T0, 5, 5),  # epoch-aligned 2-minute buckets; T0 is a multiple of 120 s
        (T0 + 120, 1, 1),
    ]
    beta = await stub.GetUsage(attribution_pb2.UsageQuery(adapter_id="beta"))
    assert (beta.totals.prompt_tokens, beta.totals.completion_tokens) == (3, 4)  # mixed tokens count whole
    acme = await stub.GetUsage(attribution_pb2.UsageQuery(tenant="acme", start=ts(T0 + 60), end=ts(T0 + 120)))
    assert (acme.totals.prompt_tokens, acme.totals.completion_tokens) == (2, 1)


async def test_unregistered_adapter_is_credited_to_nobody_and_money_is_kept(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    await stub.RecordUsage(
        iter([batch(1, request_tokens("r", prompt=2, completion=2, adapters=(("ghost", "v9", 1.0),)))])
    )
    report = await stub.GetRewards(attribution_pb2.RewardsQuery(adapter_id="ghost"))
    # default prices: 2 × 0.0000005 + 2 × 0.0000015
    assert Decimal(report.total) == Decimal("0.000004")
    assert [(line.contributor_id, line.adapter_id) for line in report.lines] == [("", "ghost")]


async def test_watch_rewards_delivers_within_one_second_of_commit(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    await price_and_register(stub)
    watch = stub.WatchRewards(attribution_pb2.WatchRewardsRequest(contributor_id="dave"))
    await watch.initial_metadata()  # subscribed
    started = time.monotonic()
    ack = await stub.RecordUsage(
        iter([batch(1, request_tokens("req-live", prompt=0, completion=10, adapters=MIX))])
    )
    committed = WorkClock()
    assert ack.acked_sequence == 1
    event = await within(watch.read(), timeout=1.0)
    assert committed.elapsed() < 1.0
    assert isinstance(event, attribution_pb2.RewardEvent)
    assert (event.contributor_id, event.adapter.id, event.adapter.version, event.request_id) == (
        "dave",
        "beta",
        "v2",
        "req-live",
    )
    assert Decimal(event.amount) == Decimal("0.0375")  # 10 × 0.05 × 0.3 × 0.25
    assert event.tokens == pytest.approx(3.0)
    assert event.ts.ToMicroseconds() / 1e6 >= time.time() - (time.monotonic() - started) - 1
    watch.cancel()


async def test_provenance_registration_is_idempotent_and_immutable(
    stub: attribution_pb2_grpc.AttributionAsyncStub,
) -> None:
    prov = provenance(("alice", TRAINER, 1.0))
    assert (await stub.RegisterProvenance(register("alpha", "v1", prov))).created
    assert not (await stub.RegisterProvenance(register("alpha", "v1", prov))).created
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegisterProvenance(register("alpha", "v1", provenance(("mallory", TRAINER, 1.0))))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_latest_version_resolves_to_the_newest_registration(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    await stub.RegisterProvenance(register("alpha", "v1", provenance(("alice", TRAINER, 1.0))))
    await stub.RegisterProvenance(register("alpha", "v2", provenance(("bob", TRAINER, 1.0))))
    await stub.RecordUsage(
        iter([batch(1, request_tokens("r", prompt=0, completion=2, adapters=(("alpha", "", 1.0),)))])
    )
    report = await stub.GetRewards(attribution_pb2.RewardsQuery(adapter_id="alpha"))
    assert [line.contributor_id for line in report.lines] == ["bob"]
