"""`openlora worker serve | config`: an inference worker (every setting: `openlora worker config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from services.common.cli import add_config_command, console, load_settings, serve_app
from services.inference.settings import WorkerSettings

app = typer.Typer(help="Inference worker: engine, adapter cache, usage.", no_args_is_help=True)
add_config_command(app, WorkerSettings)


@app.command("serve")
def serve(
    model: Annotated[
        str | None, typer.Option(help="Model folder, or `smollm2` (OPENLORA_WORKER_MODEL).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (OPENLORA_WORKER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (OPENLORA_WORKER_PORT).")] = None,
    store_address: Annotated[
        str | None, typer.Option(help="Adapter store host:port (OPENLORA_WORKER_STORE_ADDRESS).")
    ] = None,
    attribution_address: Annotated[
        str | None,
        typer.Option(help="Attribution host:port for usage (OPENLORA_WORKER_ATTRIBUTION_ADDRESS)."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (OPENLORA_WORKER_METRICS_PORT).")
    ] = None,
    lora_slots: Annotated[
        int | None, typer.Option(help="Device LoRA slots (OPENLORA_WORKER_LORA_SLOTS).")
    ] = None,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Usage spool directory (OPENLORA_WORKER_SPOOL_DIR).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Adapter disk cache (OPENLORA_WORKER_CACHE_DIR).")
    ] = None,
) -> None:
    """Run an inference worker (every setting: `openlora worker config`)."""
    from services.common.log import configure_logging

    settings = load_settings(
        WorkerSettings,
        model=model,
        host=host,
        port=port,
        store_address=store_address,
        attribution_address=attribution_address,
        metrics_port=metrics_port,
        lora_slots=lora_slots,
        spool_dir=spool_dir,
        cache_dir=cache_dir,
    )
    configure_logging("worker", settings.log_level, settings.log_format)
    # After logging is set up: importing the model stack logs (torchao), and that must go through it.
    from services.inference.app import SMOLLM2, build, model_folder

    if settings.model != SMOLLM2:
        try:
            model_folder(settings.model)  # a typo fails here, before anything listens
        except ValueError as exc:
            console.print(f"[red]cannot start the worker[/red]: {escape(str(exc))}")
            raise typer.Exit(2) from None
    serve_app(
        "worker",
        lambda: build(settings),
        lambda _, port: f"worker ready on {settings.host}:{port} (model {settings.model})",
    )
