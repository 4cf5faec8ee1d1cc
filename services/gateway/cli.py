"""`openlora gateway serve`: settings from the environment and flags, logging, then the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from services.gateway.config import GatewaySettings

console = Console(stderr=True)


def serve_gateway(**overrides: Any) -> None:
    from services.cli import load_settings
    from services.common.log import configure_logging
    from services.common.telemetry import setup_telemetry
    from services.gateway.server import Gateway

    settings = load_settings(GatewaySettings, **overrides)
    assert isinstance(settings, GatewaySettings)
    configure_logging("gateway", settings.log_level, settings.log_format)

    def ready(port: int) -> None:
        console.print(f"gateway listening on {settings.host}:{port} (workers {settings.workers})")

    async def run() -> None:
        # Built inside the loop that serves: grpc.aio channels (to the store, the workers) bind to
        # the event loop current at their creation.
        try:
            gateway = Gateway(settings, tracer_provider=setup_telemetry("gateway", settings.telemetry))
        except ValueError as exc:  # a malformed API key file or value
            raise _BadConfig(str(exc)) from None
        await gateway.run(ready)

    try:
        asyncio.run(run())
    except _BadConfig as exc:
        console.print(f"[red]cannot start the gateway[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from None
    except OSError as exc:  # a port in use
        console.print(f"[red]the gateway stopped[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None


class _BadConfig(Exception):
    pass
