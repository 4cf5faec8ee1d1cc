"""Settings of the attribution service: where the ledger lives, prices, limits and the adapter store."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import Port, ServiceSettings, StoreClientTLS


def default_database_url() -> str:
    """A SQLite file in the user's data directory (XDG_DATA_HOME, else ~/.local/share)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'openlora' / 'attribution.sqlite3'}"


class AttributionSettings(ServiceSettings, StoreClientTLS):
    """Settings of the attribution service (`openlora attribution serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_ATTRIBUTION_")

    port: Port = 50054
    """TCP port workers connect to; 0 picks a free port."""

    database_url: str = Field(default_factory=default_database_url)
    """SQLAlchemy URL of the ledger: `postgresql+psycopg://user@host/db` in production, or a SQLite
    file (the default, in the user's data directory). Both use the same Alembic migrations."""

    migrate_on_start: bool = True
    """Upgrade the schema to the newest migration when the server starts (off when an operator runs
    `openlora attribution migrate` as a separate deployment step)."""

    db_pool_size: int = Field(default=4, ge=1, le=64)
    """Database connections held open; batches from different streams commit in parallel up to this."""

    store_address: str | None = None
    """`host:port` of the adapter store, asked once per adapter version for its provenance. None means
    provenance comes only from `RegisterProvenance` pushes."""

    store_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of one provenance lookup in the adapter store."""

    currency: str = Field(default="USD", min_length=1, max_length=16)
    """ISO 4217 code (or unit) of every price and amount."""

    default_prompt_price: Decimal = Field(
        default=Decimal("0.0000005"), ge=0, max_digits=20, decimal_places=12
    )
    """Price of one prompt token for adapters without a price of their own (`SetPrice` overrides it)."""

    default_completion_price: Decimal = Field(
        default=Decimal("0.0000015"), ge=0, max_digits=20, decimal_places=12
    )
    """Price of one completion token for adapters without a price of their own."""

    max_batch_records: int = Field(default=20_000, ge=1, le=1_000_000)
    """Most token records in one `UsageBatch`; larger batches are refused with INVALID_ARGUMENT."""

    max_token_index: int = Field(default=1 << 24, ge=1)
    """Largest accepted `token_index` (a sanity bound far above any context length)."""

    max_clock_skew_s: float = Field(default=86_400.0, gt=0)
    """Records stamped further than this in the future (a broken worker clock) are billed at the time
    they arrive, with a warning naming the worker."""

    watch_queue_size: int = Field(default=10_000, ge=1)
    """Reward events buffered per `WatchRewards` subscriber; one that falls further behind is dropped
    with RESOURCE_EXHAUSTED rather than slowing ingest."""

    @model_validator(mode="after")
    def _check_database_url(self) -> Self:
        scheme = self.database_url.split(":", 1)[0]
        if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
            raise ValueError(f"database_url: unsupported scheme {scheme!r} (sqlite or postgresql+psycopg)")
        return self
