"""`openlora gateway serve | config`: the public front (every setting: `openlora gateway config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.common.cli import add_config_command, load_settings, serve_app
from services.gateway.settings import GatewaySettings

app = typer.Typer(help="Public front: auth, tenants, routing, retries.", no_args_is_help=True)
add_config_command(app, GatewaySettings)


@app.command("serve")
def serve(
    workers: Annotated[
        str | None,
        typer.Option(help="host:port,... or dns:///name:port of the workers (OPENLORA_GATEWAY_WORKERS)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (OPENLORA_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (OPENLORA_GATEWAY_PORT).")] = None,
    store_address: Annotated[
        str | None,
        typer.Option(help="Adapter store host:port; empty: no checks (OPENLORA_GATEWAY_STORE_ADDRESS)."),
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="JSON file of hashed API keys (OPENLORA_GATEWAY_API_KEYS_FILE).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (OPENLORA_GATEWAY_METRICS_PORT).")
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(help="OpenAI-compatible HTTP API port (OPENLORA_GATEWAY_HTTP_PORT)."),
    ] = None,
) -> None:
    """Run the gateway (every setting: `openlora gateway config`)."""
    from services.common.log import configure_logging
    from services.gateway.app import build

    settings = load_settings(
        GatewaySettings,
        workers=workers,
        host=host,
        port=port,
        store_address=store_address,
        api_keys_file=api_keys_file,
        metrics_port=metrics_port,
        http_port=http_port,
    )
    configure_logging("gateway", settings.log_level, settings.log_format)
    serve_app(
        "gateway",
        lambda: build(settings),
        lambda app, port: (
            f"gateway listening on {settings.host}:{port} (workers {settings.workers})"
            + (f", OpenAI-compatible HTTP on {settings.host}:{http}" if (http := _http_port(app)) else "")
        ),
    )


def _http_port(app: object) -> int | None:
    from services.gateway.app import GatewayApp

    return app.http_port if isinstance(app, GatewayApp) else None
