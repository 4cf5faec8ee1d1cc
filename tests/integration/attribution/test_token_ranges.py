"""Usage as token ranges, on PostgreSQL and SQLite: a record covering [token_index, token_index +
token_count) counts, bills and rewards exactly what the same tokens sent one record each would; a
resent range is a no-op; overlapping ranges are refused."""

from __future__ import annotations

import pytest
from openlora.v1 import adapter_store_pb2, attribution_pb2, attribution_pb2_grpc
from sqlalchemy import func, select

from services.attribution.app import AttributionApp
from services.attribution.models import RewardLedgerEntry
from tests.integration.attribution.wire import batch, provenance, register, request_tokens, token

MIX = (("alpha", "v1", 0.3), ("beta", "v1", 0.7))


def ranged(request_id: str, kind: int, start: int, count: int) -> attribution_pb2.TokenUsage:
    record = token(request_id, start, kind=kind, adapters=MIX)
    record.token_count = count
    return record


def rewards_by_contributor(attribution: AttributionApp) -> dict[str, tuple[int, int]]:
    entry = RewardLedgerEntry
    with attribution.engine.connect() as conn:
        rows = conn.execute(
            select(
                entry.contributor_id, func.sum(entry.tokens_micros), func.sum(entry.amount_picos)
            ).group_by(entry.contributor_id)
        ).all()
    return {str(c): (int(t), int(a)) for c, t, a in rows}


async def totals(stub: attribution_pb2_grpc.AttributionAsyncStub, **query: str) -> tuple[int, int]:
    usage = await stub.GetUsage(attribution_pb2.UsageQuery(**query))  # type: ignore[arg-type]
    return usage.totals.prompt_tokens, usage.totals.completion_tokens


@pytest.fixture
async def registered(stub: attribution_pb2_grpc.AttributionAsyncStub) -> None:
    trainer, data = adapter_store_pb2.TRAINER, adapter_store_pb2.DATA
    await stub.RegisterProvenance(register("alpha", "v1", provenance(("alice", trainer, 1.0))))
    await stub.RegisterProvenance(
        register("beta", "v1", provenance(("bob", trainer, 0.6), ("carol", data, 0.4)))
    )


@pytest.mark.usefixtures("registered")
async def test_ranges_count_and_reward_exactly_as_single_tokens(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    # Request "per-token": one record per token. Request "ranged": the same tokens as three ranges.
    singles = request_tokens("per-token", prompt=7, completion=9, adapters=MIX)
    ranges = [
        ranged("ranged", attribution_pb2.PROMPT, 0, 7),
        ranged("ranged", attribution_pb2.COMPLETION, 0, 4),
        ranged("ranged", attribution_pb2.COMPLETION, 4, 5),
    ]
    await stub.RecordUsage(iter([batch(1, singles, worker="w-single")]))
    single_rewards = rewards_by_contributor(attribution)
    single_totals = await totals(stub)
    assert single_totals == (7, 9)
    ack = await stub.RecordUsage(iter([batch(1, ranges, worker="w-ranged")]))
    assert (ack.inserted_records, list(ack.refused)) == (3, [])
    assert await totals(stub) == (14, 18)
    assert await totals(stub, adapter_id="beta") == (14, 18)
    both = rewards_by_contributor(attribution)
    assert both == {c: (2 * t, 2 * a) for c, (t, a) in single_rewards.items()}

    # A resend of the ranged batch (a lost ack) changes nothing.
    ack = await stub.RecordUsage(iter([batch(1, ranges, worker="w-ranged")]))
    assert (ack.inserted_records, ack.duplicate_records) == (0, 3)
    assert await totals(stub) == (14, 18)
    assert rewards_by_contributor(attribution) == both


@pytest.mark.usefixtures("registered")
async def test_overlapping_ranges_are_refused(stub: attribution_pb2_grpc.AttributionAsyncStub) -> None:
    completion = attribution_pb2.COMPLETION
    records = [
        ranged("r", completion, 0, 4),
        ranged("r", completion, 4, 4),
        ranged("r", completion, 2, 4),  # overlaps both
        ranged("r", completion, 0, 4),  # the first again: a duplicate, not an overlap
        ranged("r", completion, 8, 1),
    ]
    ack = await stub.RecordUsage(iter([batch(1, records)]))
    assert [(r.index, r.field) for r in ack.refused] == [(2, "records[2].token_index")]
    assert await totals(stub) == (0, 9)


async def test_a_range_past_the_largest_index_is_refused(
    stub: attribution_pb2_grpc.AttributionAsyncStub,
) -> None:
    record = ranged("r", attribution_pb2.COMPLETION, (1 << 24) - 2, 5)
    record.ClearField("adapters")
    ack = await stub.RecordUsage(iter([batch(1, [record])]))
    assert [r.field for r in ack.refused] == ["records[0].token_count"]
