"""Reward arithmetic without a database: split by mix weight, then by share, exact and conserved."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from services.attribution.domain import (
    AdapterShare,
    Contributor,
    Provenance,
    Role,
    TokenKind,
    TokenRecord,
    format_amount,
    from_picos,
    to_picos,
)
from services.attribution.rewards import compute_rewards, split_by_share, tally

T0_US = 1_767_225_600_000_000


def people(*shares: int) -> tuple[Contributor, ...]:
    return tuple(Contributor(f"c{i}", Role.DATA, share) for i, share in enumerate(shares))


def record(index: int, kind: TokenKind, mix: tuple[AdapterShare, ...], seconds: int = 0) -> TokenRecord:
    return TokenRecord("req", index, kind, mix, "acme", "w", T0_US + seconds * 1_000_000)


def test_split_by_share_is_exact_and_conserves_the_total() -> None:
    assert split_by_share(100, people(600_000, 400_000)) == [60, 40]
    # Three equal thirds of 100: one pico of rounding goes to exactly one contributor.
    parts = split_by_share(100, people(333_334, 333_333, 333_333))
    assert sum(parts) == 100 and sorted(parts) == [33, 33, 34]
    rng = random.Random(7)
    for _ in range(200):
        cut = sorted(rng.sample(range(1, 1_000_000), 4))
        shares = [b - a for a, b in zip([0, *cut], [*cut, 1_000_000], strict=True)]
        total = rng.randrange(10**15)
        parts = split_by_share(total, people(*shares))
        assert sum(parts) == total
        for part, share in zip(parts, shares, strict=True):
            assert abs(part - total * share / 1_000_000) <= 1


def test_mixed_tokens_split_by_weight_then_share() -> None:
    alpha, beta = AdapterShare("alpha", "v1", 700_000), AdapterShare("beta", "", 300_000)
    mix = (alpha, beta)
    records = [record(i, TokenKind.PROMPT, mix) for i in range(10)] + [
        record(i, TokenKind.COMPLETION, mix) for i in range(20)
    ]
    provenance = {
        ("alpha", "v1"): Provenance("alpha", "v1", "", (), people(600_000, 400_000)),
        ("beta", ""): Provenance("beta", "v7", "", (), ()),  # latest resolved to v7, nobody credited
    }
    prices = {
        "alpha": (to_picos(Decimal("0.01")), to_picos(Decimal("0.03"))),
        "beta": (to_picos(Decimal("0.02")), to_picos(Decimal("0.05"))),
    }
    entries = compute_rewards(tally(records), provenance, prices.__getitem__, committed_us=1)
    by_line = {(e.adapter_id, e.adapter_version, e.contributor_id): e for e in entries}
    assert set(by_line) == {("alpha", "v1", "c0"), ("alpha", "v1", "c1"), ("beta", "v7", "")}
    assert from_picos(by_line["alpha", "v1", "c0"].amount_picos) == Decimal("0.294")  # 0.7×0.7×0.6
    assert from_picos(by_line["alpha", "v1", "c1"].amount_picos) == Decimal("0.196")
    assert from_picos(by_line["beta", "v7", ""].amount_picos) == Decimal("0.36")  # money kept, unattributed
    assert by_line["beta", "v7", ""].role is Role.UNATTRIBUTED
    assert by_line["alpha", "v1", "c0"].tokens_micros == 21_000_000


def test_entries_are_per_request_and_minute() -> None:
    mix = (AdapterShare("alpha", "v1", 1_000_000),)
    records = [
        record(0, TokenKind.COMPLETION, mix, seconds=0),
        record(1, TokenKind.COMPLETION, mix, seconds=61),
    ]
    provenance = {("alpha", "v1"): Provenance("alpha", "v1", "", (), people(1_000_000))}
    entries = compute_rewards(tally(records), provenance, lambda _a: (0, 7), committed_us=1)
    assert sorted(e.minute_us - T0_US for e in entries) == [0, 60_000_000]
    assert [e.amount_picos for e in entries] == [7, 7]


def test_fractional_picos_round_half_even_once_per_group() -> None:
    # 3 tokens × 1 pico × weight 0.5 = 1.5 picos: one rounding for the group, not one per token.
    mix = (AdapterShare("a", "v1", 500_000), AdapterShare("b", "v1", 500_000))
    provenance = {(k, "v1"): Provenance(k, "v1", "", (), people(1_000_000)) for k in ("a", "b")}
    records = [record(i, TokenKind.PROMPT, mix) for i in range(3)]
    entries = compute_rewards(tally(records), provenance, lambda _a: (1, 1), committed_us=1)
    assert [e.amount_picos for e in entries] == [2, 2]


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("0.384"), "0.384"),
        (Decimal("0.000000000001"), "0.000000000001"),
        (Decimal(12), "12"),
        (Decimal(0), "0"),
    ],
)
def test_amounts_round_trip_as_exact_strings(amount: Decimal, text: str) -> None:
    assert format_amount(to_picos(amount)) == text
