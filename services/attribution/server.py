"""Assembles the attribution server: database, migrations, provenance source, servicer, server kit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from sqlalchemy import Engine

from services.attribution import db
from services.attribution.config import AttributionSettings
from services.attribution.provenance import StoreProvenanceSource
from services.attribution.service import AttributionService
from services.attribution.servicer import AttributionServicer, binding
from services.common.grpc_client import client_tls, open_channel
from services.common.grpc_server import GrpcServer
from services.common.telemetry import setup_telemetry
from services.common.trust.setup import service_identity

log = logging.getLogger("openlora.attribution")


@dataclass
class AttributionServer:
    """A built, not yet started, attribution server and what it owns."""

    server: GrpcServer
    service: AttributionService
    engine: Engine
    store_channel: grpc.aio.Channel | None

    async def close(self) -> None:
        """Stop serving (gracefully) and release the store channel and database connections."""
        self.service.feed.close()
        await self.server.stop()
        if self.store_channel is not None:
            await self.store_channel.close()
        self.engine.dispose()


def build(settings: AttributionSettings) -> AttributionServer:
    """Build the server (call inside the event loop that will run it)."""
    engine = db.make_engine(settings.database_url, pool_size=settings.db_pool_size)
    if settings.migrate_on_start:
        db.upgrade(engine)
    elif db.current_revision(engine) != db.head_revision():
        raise RuntimeError("the ledger schema is not current: run `openlora attribution migrate`")
    provider = setup_telemetry("attribution", settings.telemetry)
    channel = None
    source = None
    if settings.store_address:
        channel = open_channel(
            settings.store_address,
            settings,
            tls=client_tls(settings, "store"),
            tracer_provider=provider,
            identity=service_identity(settings, "attribution"),
            audience="store",
        )
        source = StoreProvenanceSource(channel, settings.store_timeout_s)
    service = AttributionService(engine, settings, source)
    tracer = (provider or trace.get_tracer_provider()).get_tracer("openlora.attribution")
    server = GrpcServer(
        settings,
        [binding(AttributionServicer(service, tracer))],
        component="attribution",
        tracer_provider=provider,
    )
    # WatchRewards feeds never end by themselves: end them as soon as the drain starts.
    server.on_drain(service.feed.close)
    log.info(
        "attribution ledger on %s (%s)",
        engine.url.render_as_string(hide_password=True),
        engine.dialect.name,
        extra={"store": settings.store_address or "pushed provenance only"},
    )
    return AttributionServer(server, service, engine, channel)


async def serve(settings: AttributionSettings, on_started: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight streams and close."""
    built = build(settings)
    try:
        await built.server.serve_until_signal(on_started)
    finally:
        if built.store_channel is not None:
            await built.store_channel.close()
        built.engine.dispose()
