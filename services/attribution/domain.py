"""Plain domain types of the ledger, free of protobuf and SQL, and the fixed-point units they use.

Money is exact: amounts are Decimal at the edges and integers of 1e-12 currency units ("picos") in
the database, because SQLite has no exact decimal column (its NUMERIC is a float) and both engines
sum 64-bit integers exactly. Mix weights and contributor shares are integers of 1e-6 ("micros"), so
a token's split is exact and sums to one by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from enum import IntEnum
from typing import NamedTuple

PICOS_PER_UNIT = 10**12  # money: 1 currency unit = 1e12 picos
MICROS_PER_UNIT = 10**6  # weights and shares: 1 = 1e6 micros
US_PER_MINUTE = 60_000_000

_PICO = Decimal(1).scaleb(-12)


class TokenKind(IntEnum):
    """Mirrors `openlora.v1.TokenKind` (the wire numbers are stored)."""

    PROMPT = 1
    COMPLETION = 2


class Role(IntEnum):
    """Mirrors `openlora.v1.Role`; UNATTRIBUTED marks money of an adapter nobody is known for."""

    UNATTRIBUTED = 0
    TRAINER = 1
    DATA = 2


def to_picos(amount: Decimal) -> int:
    """Round an amount to whole picos (banker's rounding, so rounding errors do not drift one way)."""
    return int((amount / _PICO).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_picos(picos: int) -> Decimal:
    return (Decimal(picos) * _PICO).normalize() if picos else Decimal(0)


def format_amount(picos: int) -> str:
    """An exact decimal string without exponent (`0.000000123`), as the wire carries money."""
    return f"{from_picos(picos):f}"


class AdapterShare(NamedTuple):
    """One adapter credited for a token and its weight in micros (a token's weights sum to 1e6).

    A tuple, so a token's whole mix hashes cheaply: the ledger groups tokens by mix."""

    adapter_id: str
    version: str  # empty: the latest version, resolved through provenance before the write
    weight_micros: int


@dataclass(slots=True)  # not frozen: built per token on the hot path, where frozen costs ~2x
class TokenRecord:
    request_id: str
    token_index: int
    kind: TokenKind
    adapters: tuple[AdapterShare, ...]
    tenant: str
    worker_id: str
    ts_us: int  # epoch microseconds
    client_request_id: str = ""  # the id the client chose: a label, not unique (request_id is)
    token_count: int = 1  # the record covers tokens [token_index, token_index + token_count)

    @property
    def key(self) -> tuple[str, int, int]:
        """The idempotency key: the ledger holds at most one record per key."""
        return (self.request_id, self.token_index, int(self.kind))


@dataclass(frozen=True, slots=True)
class UsageBatch:
    sequence: int  # sender's batch number, from 1, per worker
    worker_id: str
    records: list[TokenRecord]  # the records that passed the checks
    refused: list[RefusedRecord] = field(default_factory=list)  # the others, never written
    clock_ahead: int = 0  # records stamped too far in the future, stamped with arrival time instead


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """A record of a batch the ledger will not take: the sender dead-letters it."""

    index: int  # position in the batch
    field: str  # e.g. records[3].request_id
    reason: str


@dataclass(frozen=True, slots=True)
class Contributor:
    contributor_id: str
    role: Role
    share_micros: int  # the shares of one provenance sum to 1e6


@dataclass(frozen=True, slots=True)
class Provenance:
    """Who is credited for one adapter version."""

    adapter_id: str
    version: str
    trainer: str
    datasets: tuple[str, ...]
    contributors: tuple[Contributor, ...]


@dataclass(frozen=True, slots=True)
class Price:
    """Price of one token of each kind, in currency units."""

    prompt: Decimal
    completion: Decimal

    def of(self, kind: TokenKind) -> Decimal:
        return self.prompt if kind is TokenKind.PROMPT else self.completion


@dataclass(frozen=True, slots=True)
class RewardEntry:
    """Money one contributor earned from one adapter for one request's tokens in one minute."""

    contributor_id: str  # empty when the adapter's provenance names nobody
    role: Role
    adapter_id: str
    adapter_version: str
    tenant: str
    request_id: str
    minute_us: int  # minute of the tokens' timestamps
    tokens_micros: int  # tokens credited to the adapter (mix weights summed)
    amount_picos: int
    committed_us: int


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one batch's transaction did."""

    acked_sequence: int  # the sender's highest contiguous sequence now persisted
    inserted: int
    duplicates: int
    rewards: list[RewardEntry]
