"""The attribution service as a plain class: ingest, queries, provenance, prices and the feed,
with the blocking database work moved off the event loop. The gRPC servicer only translates."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from services.attribution import queries
from services.attribution.domain import IngestResult, Provenance, UsageBatch, to_picos
from services.attribution.feed import RewardFeed, Subscription
from services.attribution.ledger import Ledger, set_price
from services.attribution.provenance import ProvenanceRegistry, ProvenanceSource
from services.attribution.settings import AttributionSettings
from services.common.errors import Unavailable

log = logging.getLogger("openlora.attribution")


class AttributionService:
    def __init__(
        self, engine: Engine, settings: AttributionSettings, source: ProvenanceSource | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        default_price = (to_picos(settings.default_prompt_price), to_picos(settings.default_completion_price))
        self.ledger = Ledger(engine, default_price)
        self.provenance = ProvenanceRegistry(engine, source)
        self.feed = RewardFeed(settings.watch_queue_size)

    async def ingest(self, batch: UsageBatch) -> IngestResult:
        """Commit one batch and publish its rewards; raises `Unavailable` if provenance can't be had."""
        keys = {(a.adapter_id, a.version) for record in batch.records for a in record.adapters}
        provenance = await self.provenance.resolve(keys)
        try:
            result = await asyncio.to_thread(self.ledger.record, batch, provenance)
        except OperationalError as exc:
            # The database is down, restarting or locked: nothing was committed, and the sender keeps
            # the batch spooled and retries, so this is UNAVAILABLE rather than an internal error.
            log.warning("ledger write failed: %s", exc.orig or exc)
            raise Unavailable("the ledger database is unavailable; retry", retry_after_s=1.0) from exc
        self.feed.publish(result.rewards)
        return result

    async def register_provenance(self, prov: Provenance) -> bool:
        return await asyncio.to_thread(self.provenance.register, prov)

    async def set_price(self, adapter_id: str, prompt_picos: int, completion_picos: int) -> None:
        await asyncio.to_thread(set_price, self.engine, adapter_id, prompt_picos, completion_picos)

    async def usage(
        self, adapter_id: str, tenant: str, window: queries.TimeRange, client_request_id: str = ""
    ) -> queries.UsageResult:
        if client_request_id:
            return await asyncio.to_thread(
                lambda: queries.usage_of_request(self.engine, client_request_id, tenant=tenant, window=window)
            )
        return await asyncio.to_thread(
            lambda: queries.usage(self.engine, adapter_id=adapter_id, tenant=tenant, window=window)
        )

    async def rewards(
        self, contributor_id: str, adapter_id: str, tenant: str, window: queries.TimeRange
    ) -> queries.RewardsResult:
        return await asyncio.to_thread(
            lambda: queries.rewards(
                self.engine,
                contributor_id=contributor_id,
                adapter_id=adapter_id,
                tenant=tenant,
                window=window,
            )
        )

    @contextmanager
    def watch(self, contributor_id: str, adapter_id: str) -> Iterator[Subscription]:
        with self.feed.subscribe(contributor_id, adapter_id) as subscription:
            yield subscription
