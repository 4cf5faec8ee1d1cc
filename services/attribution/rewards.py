"""Reward arithmetic: each token's price split by mix weight across its adapters, then by share
across each adapter's contributors. Integers only (see `domain.py`), so the split is exact:
the contributors of an adapter receive, together, exactly the adapter's rounded amount.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from services.attribution.domain import (
    MICROS_PER_UNIT,
    US_PER_MINUTE,
    AdapterShare,
    Contributor,
    Provenance,
    RewardEntry,
    Role,
    TokenKind,
    TokenRecord,
)

# (request_id, tenant, adapter_id, version, minute_us): one ledger line per contributor of each.
GroupKey = tuple[str, str, str, str, int]
PricePicos = tuple[int, int]  # (prompt, completion) picos per token
# (request_id, tenant, kind, minute_us, mix) → number of tokens sharing all of it.
TallyKey = tuple[str, str, TokenKind, int, tuple[AdapterShare, ...]]
Tally = Counter[TallyKey]


def tally(records: Iterable[TokenRecord]) -> Tally:
    """Count tokens (each record covers `token_count`) by request, tenant, kind, minute and mix. The
    tokens of one request share all of these, so everything after this step runs per group."""
    counts: Tally = Counter()
    for r in records:
        counts[(r.request_id, r.tenant, r.kind, r.ts_us - r.ts_us % US_PER_MINUTE, r.adapters)] += (
            r.token_count
        )
    return counts


_NOBODY = (Contributor(contributor_id="", role=Role.UNATTRIBUTED, share_micros=MICROS_PER_UNIT),)


@dataclass(slots=True)
class _Group:
    contributors: tuple[Contributor, ...]
    tokens_micros: int = 0
    # Σ price_picos × weight_micros: exact, divided by 1e6 only once per group.
    amount_micro_picos: int = 0


def split_by_share(total: int, contributors: Iterable[Contributor]) -> list[int]:
    """Split `total` picos by shares (micros summing to 1e6) with the largest-remainder method,
    so the parts sum to `total` exactly and each is within one pico of its exact share."""
    people = list(contributors)
    exact = [total * c.share_micros for c in people]
    parts = [e // MICROS_PER_UNIT for e in exact]
    left = total - sum(parts)
    by_remainder = sorted(range(len(people)), key=lambda i: exact[i] % MICROS_PER_UNIT, reverse=True)
    for i in by_remainder[:left]:
        parts[i] += 1
    return parts


def compute_rewards(
    counts: Tally,
    provenance: Mapping[tuple[str, str], Provenance],
    price_of: Callable[[str], PricePicos],
    committed_us: int,
) -> list[RewardEntry]:
    """Ledger entries earned by the tallied tokens (only newly written ones: a duplicate earns nothing).

    `provenance` is keyed by (adapter_id, version as sent) and gives the resolved version; an adapter
    without contributors credits its money to the unattributed line (contributor ''), so money is
    never silently dropped.
    """
    groups: dict[GroupKey, _Group] = {}
    for (request_id, tenant, kind, minute, mix), tokens in counts.items():
        for share in mix:
            prov = provenance[(share.adapter_id, share.version)]
            key = (request_id, tenant, share.adapter_id, prov.version, minute)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(contributors=prov.contributors or _NOBODY)
            prompt, completion = price_of(share.adapter_id)
            unit = prompt if kind is TokenKind.PROMPT else completion
            group.tokens_micros += tokens * share.weight_micros
            group.amount_micro_picos += tokens * unit * share.weight_micros
    entries: list[RewardEntry] = []
    for (request_id, tenant, adapter_id, version, minute), group in groups.items():
        adapter_picos = _round_div(group.amount_micro_picos, MICROS_PER_UNIT)
        parts = split_by_share(adapter_picos, group.contributors)
        for contributor, picos in zip(group.contributors, parts, strict=True):
            entries.append(
                RewardEntry(
                    contributor_id=contributor.contributor_id,
                    role=contributor.role,
                    adapter_id=adapter_id,
                    adapter_version=version,
                    tenant=tenant,
                    request_id=request_id,
                    minute_us=minute,
                    tokens_micros=group.tokens_micros,
                    amount_picos=picos,
                    committed_us=committed_us,
                )
            )
    return entries


def _round_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half to even (non-negative integers)."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient
