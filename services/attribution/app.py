"""The attribution process: ledger database (migrated or checked), provenance from the store, the
`Attribution` service on the server kit."""

from __future__ import annotations

import logging

from opentelemetry.sdk.trace import TracerProvider

from services.attribution import db
from services.attribution.provenance import StoreProvenanceSource
from services.attribution.service import AttributionService
from services.attribution.servicer import AttributionServicer, binding
from services.attribution.settings import AttributionSettings
from services.common.app import App

log = logging.getLogger("openlora.attribution")


class AttributionApp(App):
    component = "attribution"

    def __init__(
        self, settings: AttributionSettings, *, tracer_provider: TracerProvider | None = None
    ) -> None:
        super().__init__(settings, tracer_provider=tracer_provider)
        self.settings: AttributionSettings = settings
        self.engine = db.make_engine(settings.database_url, pool_size=settings.db_pool_size)
        if settings.migrate_on_start:
            db.upgrade(self.engine)
        elif db.current_revision(self.engine) != db.head_revision():
            self.engine.dispose()
            raise RuntimeError("the ledger schema is not current: run `openlora attribution migrate`")
        source = None
        if settings.store_address:
            store = self.upstream(settings.store_address, audience="store")
            source = StoreProvenanceSource(store, settings.store_timeout_s)
        self.service = AttributionService(self.engine, settings, source)
        servicer = AttributionServicer(self.service, self.tracer)
        self.serve([binding(servicer)])
        # WatchRewards feeds and usage streams never end by themselves: end them as the drain starts.
        self.server.on_drain(self.service.feed.close)
        self.server.on_drain(servicer.end_usage_streams)
        log.info(
            "attribution ledger on %s (%s)",
            self.engine.url.render_as_string(hide_password=True),
            self.engine.dialect.name,
            extra={"store": settings.store_address or "pushed provenance only"},
        )

    async def release(self) -> None:
        self.service.feed.close()
        self.engine.dispose()


def build(settings: AttributionSettings) -> AttributionApp:
    """The service, its ledger ready, not yet listening (build it inside the loop that will run it)."""
    return AttributionApp(settings)
