"""Bad input through a real server, on PostgreSQL and SQLite. A bad usage record is refused alone,
named in the ack, while the rest of its batch is written (one record must never stop a worker's
usage); a malformed batch, or any other bad request, is INVALID_ARGUMENT naming the field, with
nothing written."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from openlora.v1 import adapter_store_pb2, attribution_pb2, attribution_pb2_grpc
from sqlalchemy import func, select

from services.attribution.app import AttributionApp
from services.attribution.models import (
    ProvenanceRow,
    RewardLedgerEntry,
    UsageEvent,
    UsageRollup,
    UsageSender,
)
from tests.integration.attribution.wire import (
    T0,
    batch,
    provenance,
    read_ack,
    register,
    request_tokens,
    token,
    ts,
)

TRAINER, DATA = adapter_store_pb2.TRAINER, adapter_store_pb2.DATA


def with_bad_record(**fields: object) -> attribution_pb2.UsageBatch:
    """A batch of valid records and, last, one with `fields` overridden."""
    bad = token("req-bad", 0)
    for name, value in fields.items():
        if name == "ts":
            bad.ts.seconds = value  # type: ignore[assignment]
        elif name == "adapters":
            del bad.adapters[:]
            bad.adapters.extend(value)  # type: ignore[arg-type]
        else:
            setattr(bad, name, value)
    return batch(1, [*request_tokens("req-good", 2, 3), bad])


def weighted(*pairs: tuple[str, float]) -> list[attribution_pb2.WeightedAdapter]:
    return list(token("x", 0, adapters=[(i, "v1", w) for i, w in pairs]).adapters)


RECORD_CASES = {
    "unknown kind": (with_bad_record(kind=7), "records[5].kind"),
    "unspecified kind": (with_bad_record(kind=0), "records[5].kind"),
    "oversized token index": (with_bad_record(token_index=1 << 30), "records[5].token_index"),
    "missing request id": (with_bad_record(request_id=""), "records[5].request_id"),
    "whitespace in request id": (with_bad_record(request_id="a b"), "records[5].request_id"),
    "missing tenant": (with_bad_record(tenant=""), "records[5].tenant"),
    "negative time": (with_bad_record(ts=-5), "records[5].ts"),
    "negative weight": (
        with_bad_record(adapters=weighted(("a", -0.5), ("b", 1.5))),
        "records[5].adapters[0].weight",
    ),
    "weights not summing to 1": (
        with_bad_record(adapters=weighted(("a", 0.5), ("b", 0.4))),
        "records[5].adapters.weight",
    ),
    "missing adapter id": (
        with_bad_record(adapters=weighted(("", 1.0))),
        "records[5].adapters[0].adapter.id",
    ),
    "adapter listed twice": (
        with_bad_record(adapters=weighted(("a", 0.5), ("a", 0.5))),
        "records[5].adapters[1].adapter",
    ),
    "adapter as latest and by version": (
        with_bad_record(adapters=[*weighted(("a", 0.5)), *token("x", 0, adapters=[("a", "", 0.5)]).adapters]),
        "records[5].adapters[1].adapter",
    ),
    "share below the resolution": (
        with_bad_record(adapters=weighted(("a", 1 - 4e-7), ("b", 4e-7))),
        "records[5].adapters[1].weight",
    ),
}
BATCH_CASES = {
    "missing worker id": (batch(1, request_tokens("r", 1, 1), worker=""), "worker_id"),
    "sequence zero": (batch(0, request_tokens("r", 1, 1)), "sequence"),
    "oversized batch": (batch(1, request_tokens("r", 0, 20_001)), "records"),
}


def violated_field(error: grpc.aio.AioRpcError) -> str:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return str(bad_request.field_violations[0].field)


def row_counts(attribution: AttributionApp) -> list[int]:
    with attribution.engine.connect() as conn:
        return [
            int(conn.execute(select(func.count()).select_from(model)).scalar_one())
            for model in (UsageEvent, UsageRollup, RewardLedgerEntry, UsageSender, ProvenanceRow)
        ]


async def expect_invalid(call: Awaitable[object], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert violated_field(caught.value) == field
    assert field in (caught.value.details() or "")


@pytest.mark.parametrize("case", list(RECORD_CASES))
async def test_bad_usage_record_is_refused_alone(
    case: str, attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    message, field = RECORD_CASES[case]
    ack = await stub.RecordUsage(iter([message]))
    assert [(r.sequence, r.index, r.field) for r in ack.refused] == [(1, 5, field)]
    assert ack.refused[0].reason
    assert (ack.acked_sequence, ack.inserted_records) == (1, 5)
    assert row_counts(attribution)[0] == 5  # the good records of the batch


@pytest.mark.parametrize("case", list(BATCH_CASES))
async def test_bad_usage_batch_is_refused_and_nothing_is_written(
    case: str, attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    message, field = BATCH_CASES[case]
    await expect_invalid(stub.RecordUsage(iter([message])), field)
    assert row_counts(attribution) == [0, 0, 0, 0, 0]


async def test_a_bad_record_does_not_stop_the_stream(
    attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    call = stub.StreamUsage()
    await call.write(batch(1, request_tokens("ok", 1, 1)))
    assert (await read_ack(call)).acked_sequence == 1
    bad = with_bad_record(kind=9)
    bad.sequence = 2
    await call.write(bad)
    ack = await read_ack(call)
    assert (ack.sequence, ack.acked_sequence) == (2, 2)
    assert [(r.sequence, r.index, r.field) for r in ack.refused] == [(2, 5, "records[5].kind")]
    await call.write(batch(3, request_tokens("after", 1, 1)))
    assert (await read_ack(call)).acked_sequence == 3
    await call.done_writing()
    assert row_counts(attribution)[0] == 2 + 5 + 2


PROVENANCE_CASES: dict[str, tuple[attribution_pb2.RegisterProvenanceRequest, str]] = {
    "shares not summing to 1": (
        register("a", "v1", provenance(("alice", TRAINER, 0.6), ("bob", DATA, 0.3))),
        "provenance.contributors.share",
    ),
    "negative share": (
        register("a", "v1", provenance(("alice", TRAINER, -0.5), ("bob", DATA, 1.5))),
        "provenance.contributors[0].share",
    ),
    "unknown role": (
        register("a", "v1", provenance(("alice", TRAINER, 0.5), ("bob", 5, 0.5))),
        "provenance.contributors[1].role",
    ),
    "missing contributor id": (
        register("a", "v1", provenance(("", TRAINER, 1.0))),
        "provenance.contributors[0].id",
    ),
    "no contributors": (register("a", "v1", provenance()), "provenance.contributors"),
    "missing version": (register("a", "", provenance(("alice", TRAINER, 1.0))), "adapter.version"),
    "missing adapter id": (register("", "v1", provenance(("alice", TRAINER, 1.0))), "adapter.id"),
}


@pytest.mark.parametrize("case", list(PROVENANCE_CASES))
async def test_bad_provenance_is_refused_and_nothing_is_written(
    case: str, attribution: AttributionApp, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    request, field = PROVENANCE_CASES[case]
    await expect_invalid(stub.RegisterProvenance(request), field)
    assert row_counts(attribution) == [0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("prompt", "completion", "field"),
    [
        ("-1", "0.1", "prompt_price"),
        ("0.1", "abc", "completion_price"),
        ("0.0000000000001", "0", "prompt_price"),
        ("", "0", "prompt_price"),
        ("NaN", "0", "prompt_price"),
    ],
)
async def test_bad_price_is_refused(
    prompt: str, completion: str, field: str, stub: attribution_pb2_grpc.AttributionAsyncStub
) -> None:
    request = attribution_pb2.SetPriceRequest(
        adapter_id="a", prompt_price=prompt, completion_price=completion
    )
    await expect_invalid(stub.SetPrice(request), field)


QueryCall = Callable[["attribution_pb2_grpc.AttributionAsyncStub"], Awaitable[object]]  # a .pyi-only class
QUERY_CASES: dict[str, tuple[QueryCall, str]] = {
    "bucket not whole minutes": (
        lambda s: s.GetUsage(attribution_pb2.UsageQuery(bucket=duration_pb2.Duration(seconds=90))),
        "bucket",
    ),
    "end before start": (
        lambda s: s.GetRewards(attribution_pb2.RewardsQuery(start=ts(T0 + 60), end=ts(T0))),
        "end",
    ),
    "control character in contributor": (
        lambda s: s.GetRewards(attribution_pb2.RewardsQuery(contributor_id="a\x00b")),
        "contributor_id",
    ),
}


@pytest.mark.parametrize("case", list(QUERY_CASES))
async def test_bad_query_is_refused(case: str, stub: attribution_pb2_grpc.AttributionAsyncStub) -> None:
    call, field = QUERY_CASES[case]
    await expect_invalid(call(stub), field)
