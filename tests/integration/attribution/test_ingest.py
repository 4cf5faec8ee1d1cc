"""RecordUsage / StreamUsage through a real server, on PostgreSQL and SQLite: exact counts under
duplicates, out-of-order batches and resends after a stream dies mid-batch."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from openlora.v1 import attribution_pb2, attribution_pb2_grpc
from sqlalchemy import func, select

from services.attribution.app import AttributionApp, build
from services.attribution.models import RewardLedgerEntry, UsageEvent
from services.common.grpc_client import open_channel
from tests.integration.attribution.wire import attribution_settings, batch, read_ack, request_tokens
from tests.kit.postgres import create_database, drop_database
from tests.kit.service_auth import trusted


def count(attribution: AttributionApp) -> int:
    with attribution.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one())


async def stream_acks(
    stub: attribution_pb2_grpc.AttributionAsyncStub, batches: list[attribution_pb2.UsageBatch]
) -> list[attribution_pb2.RecordAck]:
    """Send batches one at a time on StreamUsage, collecting the ack of each."""
    call = stub.StreamUsage()
    acks = []
    for message in batches:
        await call.write(message)
        acks.append(await read_ack(call))
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    return acks


async def test_duplicates_and_out_of_order_batches_give_exact_counts(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    r1 = request_tokens("req-1", prompt=4, completion=6)
    r2 = request_tokens("req-2", prompt=3, completion=5)
    acks = await stream_acks(
        stub,
        [
            batch(2, r2),  # arrives before 1: persisted, not yet contiguous
            batch(1, r1[:7]),
            batch(2, r2),  # a resend after a lost ack
            batch(3, r1[3:] + r2[:2]),  # overlaps both earlier batches
        ],
    )
    assert [a.acked_sequence for a in acks] == [0, 2, 2, 3]
    assert [a.inserted_records for a in acks] == [8, 7, 0, 3]
    assert [a.duplicate_records for a in acks] == [0, 0, 8, 6]
    assert count(attribution) == 18

    usage = await stub.GetUsage(attribution_pb2.UsageQuery())
    assert (usage.totals.prompt_tokens, usage.totals.completion_tokens) == (7, 11)
    by_adapter = await stub.GetUsage(attribution_pb2.UsageQuery(adapter_id="alpha", tenant="acme"))
    assert (by_adapter.totals.prompt_tokens, by_adapter.totals.completion_tokens) == (7, 11)


async def test_record_usage_acks_highest_contiguous_sequence_across_streams(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    tokens = request_tokens("req-1", prompt=0, completion=40)
    first = await stub.RecordUsage(
        iter([batch(1, tokens[0:10]), batch(2, tokens[10:20]), batch(4, tokens[30:40])])
    )
    assert (first.acked_sequence, first.inserted_records) == (2, 30)
    # The gap is filled on a new stream; the ack never runs ahead of what this stream sent...
    second = await stub.RecordUsage(iter([batch(3, tokens[20:30])]))
    assert second.acked_sequence == 3
    # ...and a resend of 4 (its ack was never seen) confirms it without counting it twice.
    third = await stub.RecordUsage(iter([batch(4, tokens[30:40])]))
    assert (third.acked_sequence, third.inserted_records, third.duplicate_records) == (4, 0, 10)
    assert count(attribution) == 40


async def test_senders_are_independent(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    a = await stub.RecordUsage(iter([batch(1, request_tokens("a", 0, 5), worker="w-a")]))
    b = await stub.RecordUsage(iter([batch(5, request_tokens("b", 0, 5), worker="w-b")]))
    assert (a.acked_sequence, b.acked_sequence) == (1, 0)
    assert count(attribution) == 10


async def test_killed_stream_loses_nothing_acked_and_resend_doubles_nothing(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    tokens = request_tokens("req-kill", prompt=100, completion=400)
    batches = [batch(i + 1, tokens[i * 50 : (i + 1) * 50]) for i in range(10)]
    port = attribution.server.port
    async with open_channel(f"127.0.0.1:{port}", **trusted("attribution")) as channel:
        call = attribution_pb2_grpc.AttributionStub(channel).StreamUsage()
        acked = 0
        for message in batches[:4]:
            await call.write(message)
            acked = (await read_ack(call)).acked_sequence
        # Two more batches go out and the stream dies before their acks come back.
        await call.write(batches[4])
        await call.write(batches[5])
        call.cancel()
    assert acked == 4
    await asyncio.sleep(0.2)  # let the server finish whatever it had started
    persisted = count(attribution)
    assert persisted >= 4 * 50, "an acked batch was lost"
    assert persisted in (200, 250, 300), "a batch was half written"

    # The sender resends everything after its last ack, on a new stream.
    acks = await stream_acks(stub, batches[acked:])
    assert acks[-1].acked_sequence == 10
    assert count(attribution) == 500
    with attribution.engine.connect() as conn:
        credited = conn.execute(select(func.sum(RewardLedgerEntry.tokens_micros))).scalar_one()
    assert int(credited) == 500 * 1_000_000  # each token earned exactly once


async def test_concurrent_streams_count_exactly(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    async def sender(worker: int) -> attribution_pb2.RecordAck:
        tokens = request_tokens(f"req-{worker}", prompt=50, completion=150)
        # Every batch is sent twice, as a sender that keeps losing acks would.
        batches = [batch(i + 1, tokens[i * 40 : (i + 1) * 40], worker=f"w{worker}") for i in range(5)]
        return await stub.RecordUsage(iter(batches + batches))

    results = await asyncio.gather(*(sender(w) for w in range(4)))
    assert [r.acked_sequence for r in results] == [5, 5, 5, 5]
    assert sum(r.inserted_records for r in results) == 800
    assert count(attribution) == 800


async def test_sender_that_restarted_its_numbering_is_not_acked_ahead(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    before = await stub.RecordUsage(iter([batch(i, request_tokens(f"old-{i}", 0, 3)) for i in (1, 2, 3)]))
    assert before.acked_sequence == 3
    # Same worker id, spool lost, numbering from 1 again: its new records are still written, and the
    # ack never claims a sequence this stream has not sent.
    after = await stub.RecordUsage(iter([batch(1, request_tokens("new-1", 0, 4))]))
    assert (after.acked_sequence, after.inserted_records) == (1, 4)
    assert count(attribution) == 13


async def test_key_repeated_inside_a_batch_is_written_once(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    tokens = request_tokens("req", 0, 3)
    ack = await stub.RecordUsage(iter([batch(1, [*tokens, tokens[1]])]))
    assert (ack.inserted_records, ack.duplicate_records) == (3, 1)
    assert count(attribution) == 3


async def test_a_large_batch_with_old_records_throughout_writes_only_the_new(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    # SQLite writes a batch's events 500 rows per statement: old keys in every part, new ones after.
    tokens = request_tokens("long", prompt=0, completion=1_800)
    first = await stub.RecordUsage(iter([batch(1, tokens[::3])]))
    assert first.inserted_records == 600
    ack = await stub.RecordUsage(iter([batch(2, tokens)]))
    assert (ack.acked_sequence, ack.inserted_records, ack.duplicate_records) == (2, 1_200, 600)
    assert count(attribution) == 1_800
    usage = await stub.GetUsage(attribution_pb2.UsageQuery())
    assert usage.totals.completion_tokens == 1_800


async def test_database_gone_is_unavailable_not_internal() -> None:
    url = create_database("openlora_attr_gone")
    built = build(attribution_settings(url, grace_period_s=1.0))
    try:
        await built.start()
        async with open_channel(f"127.0.0.1:{built.server.port}", **trusted("attribution")) as channel:
            stub = attribution_pb2_grpc.AttributionStub(channel)
            assert (await stub.RecordUsage(iter([batch(1, request_tokens("a", 0, 2))]))).acked_sequence == 1
            drop_database(url)  # terminates the server's connections too
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RecordUsage(iter([batch(2, request_tokens("b", 0, 2))]))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await built.close()
        drop_database(url)
