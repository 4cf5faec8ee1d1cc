"""The read path: usage from the per-minute rollups (or, by client request id, from the events),
rewards from the ledger entries.

Both are resolved to the minute: a minute counts when its start lies in [start, end). Buckets are
whole minutes wide, aligned on `start` (or on the epoch when there is no start), and only buckets
holding something are returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Engine, case, func, select

from services.attribution.domain import US_PER_MINUTE, TokenKind
from services.attribution.ledger import ALL_ADAPTERS
from services.attribution.models import RewardLedgerEntry, UsageEvent, UsageRollup


@dataclass(frozen=True)
class TimeRange:
    start_us: int | None = None  # inclusive
    end_us: int | None = None  # exclusive
    bucket_us: int | None = None  # a positive multiple of a minute, or None for totals only

    def __post_init__(self) -> None:
        if self.bucket_us is not None and (self.bucket_us <= 0 or self.bucket_us % US_PER_MINUTE):
            raise ValueError("bucket_us must be a positive whole number of minutes")

    def where(self, column: Any) -> list[ColumnElement[bool]]:
        conditions = []
        if self.start_us is not None:
            conditions.append(column >= self.start_us)
        if self.end_us is not None:
            conditions.append(column < self.end_us)
        return conditions

    def bucket_of(self, column: Any) -> Any:
        """SQL for the start of the bucket holding `column` (integer division on both engines)."""
        assert self.bucket_us is not None
        origin = self.start_us or 0
        return (column - origin) // self.bucket_us * self.bucket_us + origin


@dataclass(frozen=True)
class UsageCount:
    start_us: int | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class UsageResult:
    totals: UsageCount
    buckets: list[UsageCount] = field(default_factory=list)


def usage(engine: Engine, *, adapter_id: str = "", tenant: str = "", window: TimeRange) -> UsageResult:
    minute = UsageRollup.minute_us
    conditions = [UsageRollup.adapter_id == (adapter_id or ALL_ADAPTERS), *window.where(minute)]
    if tenant:
        conditions.append(UsageRollup.tenant == tenant)
    sums = (func.sum(UsageRollup.prompt_tokens), func.sum(UsageRollup.completion_tokens))
    return _usage_counts(engine, minute, sums, conditions, window)


def usage_of_request(
    engine: Engine, client_request_id: str, *, tenant: str = "", window: TimeRange
) -> UsageResult:
    """Usage of the requests a client sent under one id, counted from the events (clients may reuse
    an id, so this can span several requests and tenants)."""
    minute = UsageEvent.ts_us - UsageEvent.ts_us % US_PER_MINUTE
    conditions = [UsageEvent.client_request_id == client_request_id, *window.where(minute)]
    if tenant:
        conditions.append(UsageEvent.tenant == tenant)
    sums = tuple(
        func.sum(case((UsageEvent.kind == int(kind), UsageEvent.token_count), else_=0)) for kind in TokenKind
    )
    return _usage_counts(engine, minute, sums, conditions, window)


def _usage_counts(
    engine: Engine,
    minute: Any,
    sums: tuple[Any, ...],
    conditions: list[ColumnElement[bool]],
    window: TimeRange,
) -> UsageResult:
    """Totals (and buckets) of `sums` (prompt, completion) over the rows matching `conditions`."""
    prompt_sum, completion_sum = (func.coalesce(total, 0) for total in sums)
    with engine.connect().execution_options(readonly=True) as conn:
        prompt, completion = conn.execute(select(prompt_sum, completion_sum).where(*conditions)).one()
        totals = UsageCount(window.start_us, int(prompt), int(completion))
        if window.bucket_us is None:
            return UsageResult(totals)
        bucket = window.bucket_of(minute).label("bucket")
        rows = conn.execute(
            select(bucket, prompt_sum, completion_sum).where(*conditions).group_by(bucket).order_by(bucket)
        )
        return UsageResult(totals, [UsageCount(int(b), int(p), int(c)) for b, p, c in rows])


@dataclass(frozen=True)
class RewardLineResult:
    contributor_id: str
    adapter_id: str
    tokens_micros: int
    amount_picos: int


@dataclass(frozen=True)
class RewardsResult:
    total_picos: int
    lines: list[RewardLineResult]
    buckets: list[tuple[int, int]]  # (bucket start us, amount picos)


def rewards(
    engine: Engine, *, contributor_id: str = "", adapter_id: str = "", tenant: str = "", window: TimeRange
) -> RewardsResult:
    entry = RewardLedgerEntry
    conditions = window.where(entry.minute_us)
    if contributor_id:
        conditions.append(entry.contributor_id == contributor_id)
    if adapter_id:
        conditions.append(entry.adapter_id == adapter_id)
    if tenant:
        conditions.append(entry.tenant == tenant)
    amount = func.sum(entry.amount_picos)
    with engine.connect().execution_options(readonly=True) as conn:
        rows = conn.execute(
            select(entry.contributor_id, entry.adapter_id, func.sum(entry.tokens_micros), amount)
            .where(*conditions)
            .group_by(entry.contributor_id, entry.adapter_id)
            .order_by(amount.desc(), entry.contributor_id, entry.adapter_id)
        )
        lines = [RewardLineResult(c, a, int(t), int(m)) for c, a, t, m in rows]
        buckets: list[tuple[int, int]] = []
        if window.bucket_us is not None:
            bucket = window.bucket_of(entry.minute_us).label("bucket")
            buckets = [
                (int(b), int(m))
                for b, m in conn.execute(
                    select(bucket, amount).where(*conditions).group_by(bucket).order_by(bucket)
                )
            ]
    return RewardsResult(sum(line.amount_picos for line in lines), lines, buckets)
