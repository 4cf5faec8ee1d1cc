"""Protobuf → domain, refusing bad input with INVALID_ARGUMENT that names the field.

A batch is checked whole before anything is written, so a refused batch leaves no trace.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

from openlora.v1 import adapter_store_pb2, attribution_pb2

from services.attribution.domain import (
    AdapterShare,
    Contributor,
    Provenance,
    RefusedRecord,
    Role,
    TokenKind,
    TokenRecord,
    UsageBatch,
)
from services.common.errors import InvalidArgument
from services.common.request_checks import (
    MAX_ADAPTER_ID_CHARS,
    check_id,
    check_mix_adapters,
    check_request_id,
    check_tenant,
    to_micros_summing_to_one,
)

__all__ = ["check_id", "provenance", "usage_batch"]

# The ledger stores sequences as signed 64-bit integers (SQLite INTEGER, PostgreSQL BIGINT).
_MAX_SEQUENCE = 2**63 - 1
_KINDS = {attribution_pb2.PROMPT: TokenKind.PROMPT, attribution_pb2.COMPLETION: TokenKind.COMPLETION}
_ROLES = {adapter_store_pb2.TRAINER: Role.TRAINER, adapter_store_pb2.DATA: Role.DATA}


def usage_batch(
    message: attribution_pb2.UsageBatch,
    *,
    max_records: int,
    max_token_index: int,
    max_future_us: int,
    now_us: int | None = None,
    mixes: CheckedMixes | None = None,
) -> UsageBatch:
    """The batch's good records, and its bad ones as refusals: one bad record must not hold back
    the rest of a worker's usage (the sender dead-letters the refused ones). A malformed batch as a
    whole (sequence, worker id, size) is refused outright. `mixes` keeps the mixes checked so far
    across batches (a running request sends its mix again in every flush)."""
    if not 1 <= message.sequence <= _MAX_SEQUENCE:
        raise InvalidArgument("sequence", f"must be from 1 to {_MAX_SEQUENCE}, got {message.sequence}")
    worker_id = check_id("worker_id", message.worker_id)
    if len(message.records) > max_records:
        raise InvalidArgument("records", f"{len(message.records)} records; at most {max_records} per batch")
    now_us = now_us if now_us is not None else time.time_ns() // 1000
    checker = _BatchChecker(
        worker_id,
        max_token_index,
        now_us,
        now_us + max_future_us,
        mixes if mixes is not None else CheckedMixes(),
    )
    records, refused = [], []
    ranges = _Ranges()
    for i, r in enumerate(message.records):
        try:
            record = checker.record(i, r)
            ranges.check(i, record)
        except InvalidArgument as exc:
            refused.append(RefusedRecord(i, exc.field, exc.problem))
            continue
        records.append(record)
    return UsageBatch(
        sequence=message.sequence,
        worker_id=worker_id,
        records=records,
        refused=refused,
        clock_ahead=checker.clock_ahead,
    )


class _Ranges:
    """Token ranges of one batch per (request, kind): a range may repeat exactly (a resend is
    deduplicated by its key) but never overlap another, which would count its tokens twice. Ranges
    mostly arrive in order, so the common check is one comparison with the last one."""

    def __init__(self) -> None:
        # (request, kind) -> sorted starts, and each start's (end, record index)
        self._starts: dict[tuple[str, int], list[int]] = {}
        self._ranges: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}

    def check(self, index: int, record: TokenRecord) -> None:
        key = (record.request_id, int(record.kind))
        start, end = record.token_index, record.token_index + record.token_count
        starts = self._starts.setdefault(key, [])
        ranges = self._ranges.setdefault(key, {})
        if not starts or start >= ranges[starts[-1]][0]:
            starts.append(start)
            ranges[start] = (end, index)
            return
        same = ranges.get(start)
        if same is not None and same[0] == end:
            return
        at = bisect.bisect_left(starts, start)
        for neighbour in starts[max(0, at - 1) : at + 1]:
            other_end, other_index = ranges[neighbour]
            if start < other_end and neighbour < end:
                raise InvalidArgument(
                    f"records[{index}].token_index",
                    f"tokens [{start}, {end}) overlap records[{other_index}]'s [{neighbour}, {other_end})",
                )
        starts.insert(at, start)
        ranges[start] = (end, index)


# (id, version, weight) of each adapter of a token, as sent.
_MixKey = tuple[tuple[str, str, float], ...]


class CheckedMixes:
    """Mixes that passed the checks, as the ledger's shares; forgotten all at once past `max_entries`
    (a mix's check depends on nothing but the mix, so a cached answer never goes stale)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._shares: dict[_MixKey, tuple[AdapterShare, ...]] = {(): ()}

    def get(self, key: _MixKey) -> tuple[AdapterShare, ...] | None:
        return self._shares.get(key)

    def add(self, key: _MixKey, shares: tuple[AdapterShare, ...]) -> None:
        if len(self._shares) >= self.max_entries:
            self._shares = {(): ()}
        self._shares[key] = shares


class _BatchChecker:
    """Checks the records of one batch. Tokens of one request repeat its ids and mix, so each
    distinct id is checked once per batch and each mix once while `mixes` holds it (this is the
    ingest hot path)."""

    def __init__(
        self, worker_id: str, max_token_index: int, now_us: int, latest_us: int, mixes: CheckedMixes
    ) -> None:
        self.worker_id = worker_id
        self.max_token_index = max_token_index
        self.now_us = now_us
        self.latest_us = latest_us
        self.good_ids: set[str] = {worker_id}
        self.mixes = mixes
        self.previous: attribution_pb2.TokenUsage | None = None  # last record whose mix was checked
        self.previous_mix: tuple[AdapterShare, ...] = ()
        self.clock_ahead = 0

    def _id(self, field: str, value: str, check: Callable[[str, str], str] = check_id) -> str:
        if value not in self.good_ids:
            check(field, value)
            if value:  # "" passes only the optional checks: never let it pass a required one
                self.good_ids.add(value)
        return value

    def record(self, i: int, r: attribution_pb2.TokenUsage) -> TokenRecord:
        field = f"records[{i}]"
        kind = _KINDS.get(r.kind)
        if kind is None:
            raise InvalidArgument(f"{field}.kind", f"must be PROMPT or COMPLETION, got {r.kind}")
        count = r.token_count or 1
        if r.token_index + count - 1 > self.max_token_index:
            raise InvalidArgument(
                f"{field}.token_count" if r.token_count > 1 else f"{field}.token_index",
                f"the range ends past {self.max_token_index}",
            )
        if r.HasField("ts"):
            seconds, nanos = r.ts.seconds, r.ts.nanos
            if seconds < 0 or not 0 <= nanos < 1_000_000_000:
                raise InvalidArgument(f"{field}.ts", "must be a valid time after 1970")
            ts_us = seconds * 1_000_000 + nanos // 1000
            if ts_us > self.latest_us:
                # The worker's clock is wrong, not the usage: bill it, at the time it arrived.
                self.clock_ahead += 1
                ts_us = self.now_us
        else:
            ts_us = self.now_us  # a sender without a clock: the ledger stamps arrival
        if self.previous is not None and r.adapters == self.previous.adapters:
            adapters = self.previous_mix  # the next token of the same request, most often
        else:
            mix_key = tuple((a.adapter.id, a.adapter.version, a.weight) for a in r.adapters)
            known = self.mixes.get(mix_key)
            if known is None:
                known = _mix(f"{field}.adapters", mix_key)
                self.mixes.add(mix_key, known)
            adapters = known
            self.previous, self.previous_mix = r, adapters
        return TokenRecord(
            request_id=self._id(f"{field}.request_id", r.request_id),
            token_index=r.token_index,
            kind=kind,
            adapters=adapters,
            tenant=self._id(f"{field}.tenant", r.tenant, check_tenant),
            worker_id=self._id(f"{field}.worker_id", r.worker_id) if r.worker_id else self.worker_id,
            ts_us=ts_us,
            client_request_id=self._id(f"{field}.client_request_id", r.client_request_id, check_request_id),
            token_count=count,
        )


def _mix(field: str, mix: _MixKey) -> tuple[AdapterShare, ...]:
    check_mix_adapters(field, mix)
    weights = to_micros_summing_to_one(field, "weight", [weight for _, _, weight in mix])
    return tuple(
        AdapterShare(adapter_id, version, w) for (adapter_id, version, _), w in zip(mix, weights, strict=True)
    )


def provenance(
    field: str, adapter_id: str, version: str, message: adapter_store_pb2.Provenance
) -> Provenance:
    """A provenance from the wire; contributors are required and their shares must sum to 1."""
    if not message.contributors:
        raise InvalidArgument(f"{field}.contributors", "must name at least one contributor")
    seen: set[str] = set()
    roles = []
    for i, c in enumerate(message.contributors):
        contributor_id = check_id(f"{field}.contributors[{i}].id", c.id, max_chars=MAX_ADAPTER_ID_CHARS)
        if contributor_id in seen:
            raise InvalidArgument(f"{field}.contributors[{i}].id", "listed twice")
        seen.add(contributor_id)
        role = _ROLES.get(c.role)
        if role is None:
            raise InvalidArgument(f"{field}.contributors[{i}].role", f"must be TRAINER or DATA, got {c.role}")
        roles.append(role)
    shares = to_micros_summing_to_one(
        f"{field}.contributors", "share", [c.share for c in message.contributors]
    )
    for i, dataset in enumerate(message.datasets):
        if not dataset or len(dataset) > 1024:
            raise InvalidArgument(f"{field}.datasets[{i}]", "must be 1 to 1024 characters")
    if len(message.trainer) > 1024:
        raise InvalidArgument(f"{field}.trainer", "longer than 1024 characters")
    return Provenance(
        adapter_id=adapter_id,
        version=version,
        trainer=message.trainer,
        datasets=tuple(message.datasets),
        contributors=tuple(
            Contributor(c.id, role, share)
            for c, role, share in zip(message.contributors, roles, shares, strict=True)
        ),
    )
