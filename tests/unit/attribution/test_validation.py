"""Protobuf → domain conversion: good batches become exact domain records, bad ones name the field."""

from __future__ import annotations

from typing import Any

import pytest
from openlora.v1 import adapter_store_pb2, attribution_pb2

from services.attribution import validation
from services.attribution.domain import MICROS_PER_UNIT, TokenKind
from services.common.errors import InvalidArgument
from services.common.request_checks import to_micros_summing_to_one
from tests.integration.attribution.wire import T0, batch, provenance, request_tokens, token

LIMITS: dict[str, Any] = {
    "max_records": 100,
    "max_token_index": 1000,
    "max_future_us": 60_000_000,
    "now_us": T0 * 1_000_000,
}


def test_good_batch_becomes_domain_records() -> None:
    mix = (("alpha", "v1", 0.7), ("beta", "", 0.3))
    message = batch(4, request_tokens("req", prompt=2, completion=1, adapters=mix), worker="w-1")
    converted = validation.usage_batch(message, **LIMITS)
    assert (converted.sequence, converted.worker_id, len(converted.records)) == (4, "w-1", 3)
    first = converted.records[0]
    assert first.key == ("req", 0, int(TokenKind.PROMPT))
    assert (first.tenant, first.worker_id, first.ts_us) == ("acme", "w-1", T0 * 1_000_000)
    assert [(a.adapter_id, a.version, a.weight_micros) for a in first.adapters] == [
        ("alpha", "v1", 700_000),
        ("beta", "", 300_000),
    ]
    assert converted.records[2].kind is TokenKind.COMPLETION


def test_float32_weights_are_corrected_to_sum_exactly_to_one() -> None:
    thirds = [0.3333333432674408] * 3  # float32(1/3) widened to double, as a worker may send
    micros = to_micros_summing_to_one("adapters", "weight", thirds)
    assert sum(micros) == MICROS_PER_UNIT
    assert sorted(micros) == [333_333, 333_333, 333_334]


def test_missing_timestamp_is_stamped_on_arrival() -> None:
    record = token("req", 0)
    record.ClearField("ts")
    converted = validation.usage_batch(batch(1, [record]), **LIMITS)
    assert converted.records[0].ts_us == LIMITS["now_us"]


def refused_field(record: attribution_pb2.TokenUsage) -> str:
    """The field named by the refusal of `record`, sent between two good records."""
    before, after = token("ok", 0), token("ok", 1)
    converted = validation.usage_batch(batch(1, [before, record, after]), **LIMITS)
    assert [r.key[:2] for r in converted.records] == [("ok", 0), ("ok", 1)]  # the rest is kept
    (refusal,) = converted.refused
    assert refusal.index == 1
    return refusal.field.replace("records[1]", "records[0]")


def test_a_mix_is_checked_in_each_record_that_differs() -> None:
    good = token("req", 0, adapters=(("alpha", "v1", 1.0),))
    bad = token("req", 1, adapters=(("alpha", "v1", 0.5),))
    converted = validation.usage_batch(batch(1, [good, good, bad]), **LIMITS)
    assert len(converted.records) == 2
    assert [(r.index, r.field) for r in converted.refused] == [(2, "records[2].adapters.weight")]


def test_a_clock_far_ahead_is_billed_at_arrival() -> None:
    record = token("req", 0)
    record.ts.FromSeconds(T0 + 2 * 86_400)  # two days ahead; the skew allows a minute
    converted = validation.usage_batch(batch(1, [record, token("req", 1)]), **LIMITS)
    assert [r.ts_us for r in converted.records] == [LIMITS["now_us"], T0 * 1_000_000]
    assert (converted.clock_ahead, converted.refused) == (1, [])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda t: setattr(t, "token_index", 1001), "records[0].token_index"),
        (lambda t: setattr(t.ts, "nanos", -1), "records[0].ts"),
        (lambda t: setattr(t, "request_id", "job 42"), "records[0].request_id"),
        (lambda t: setattr(t, "request_id", ""), "records[0].request_id"),
        (lambda t: setattr(t, "tenant", ""), "records[0].tenant"),
        (lambda t: setattr(t, "client_request_id", "job 42"), "records[0].client_request_id"),
        (lambda t: setattr(t, "worker_id", "bad\tid"), "records[0].worker_id"),
        (lambda t: setattr(t.adapters[0], "weight", float("nan")), "records[0].adapters[0].weight"),
        (lambda t: setattr(t.adapters[0], "weight", 1e-9), "records[0].adapters[0].weight"),
        (lambda t: setattr(t.adapters[0].adapter, "id", "x" * 257), "records[0].adapters[0].adapter.id"),
        (
            lambda t: setattr(t.adapters[0].adapter, "version", "v 1"),
            "records[0].adapters[0].adapter.version",
        ),
    ],
)
def test_bad_record_is_refused_alone_naming_the_field(change: object, field: str) -> None:
    record = token("req", 0)
    change(record)  # type: ignore[operator]
    assert refused_field(record) == field


def test_one_adapter_named_latest_and_by_version_is_refused() -> None:
    record = token("req", 0, adapters=(("alpha", "", 0.5), ("alpha", "v1", 0.5)))
    assert refused_field(record) == "records[0].adapters[1].adapter"


def test_oversized_batch_is_refused_before_its_records_are_read() -> None:
    message = batch(1, request_tokens("req", 0, 101))
    with pytest.raises(InvalidArgument) as caught:
        validation.usage_batch(message, **LIMITS)
    assert caught.value.field == "records"


def test_provenance_shares_become_exact_micros() -> None:
    message = provenance(
        ("alice", adapter_store_pb2.TRAINER, 0.5),
        ("bob", adapter_store_pb2.DATA, 0.25),
        ("carol", adapter_store_pb2.DATA, 0.25),
    )
    converted = validation.provenance("provenance", "alpha", "v1", message)
    assert [(c.contributor_id, c.role.name, c.share_micros) for c in converted.contributors] == [
        ("alice", "TRAINER", 500_000),
        ("bob", "DATA", 250_000),
        ("carol", "DATA", 250_000),
    ]
    assert converted.datasets == ("ds://corpus",)


def test_provenance_contributor_listed_twice_is_refused() -> None:
    message = provenance(("alice", adapter_store_pb2.TRAINER, 0.5), ("alice", adapter_store_pb2.DATA, 0.5))
    with pytest.raises(InvalidArgument) as caught:
        validation.provenance("provenance", "alpha", "v1", message)
    assert caught.value.field == "provenance.contributors[1].id"


def test_unknown_kind_value_from_a_newer_sender() -> None:
    record = attribution_pb2.TokenUsage(request_id="r", token_index=0, kind=3, tenant="t")  # type: ignore[arg-type]
    assert refused_field(record) == "records[0].kind"


def test_mixes_checked_in_one_batch_serve_the_next_and_bad_ones_are_never_kept() -> None:
    mixes = validation.CheckedMixes()
    mix = (("alpha", "v1", 0.7), ("beta", "", 0.3))
    bad = (("alpha", "", 0.5), ("alpha", "v1", 0.5))
    first = validation.usage_batch(
        batch(1, [token("req", 0, adapters=mix), token("odd", 0, adapters=bad)]), **LIMITS, mixes=mixes
    )
    second = validation.usage_batch(
        batch(2, [token("req", 1, adapters=mix), token("odd", 1, adapters=bad)]), **LIMITS, mixes=mixes
    )
    # The same shares object: the second batch did not check the mix again.
    assert second.records[0].adapters is first.records[0].adapters
    assert [r.field for r in first.refused] == ["records[1].adapters[1].adapter"]
    assert [r.field for r in second.refused] == ["records[1].adapters[1].adapter"]


def test_checked_mixes_are_forgotten_at_once_past_their_bound() -> None:
    mixes = validation.CheckedMixes(max_entries=3)  # the empty mix and two others
    shares = [
        validation.usage_batch(
            batch(i + 1, [token("req", i, adapters=((f"a{i}", "v1", 1.0),))]), **LIMITS, mixes=mixes
        )
        .records[0]
        .adapters
        for i in range(3)
    ]
    assert mixes.get((("a0", "v1", 1.0),)) is None  # the third mix made room by forgetting the rest
    assert mixes.get((("a2", "v1", 1.0),)) is shares[2]
