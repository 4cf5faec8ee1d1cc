"""`openlora worker serve`: settings from the environment and flags, logging, then the worker."""

from __future__ import annotations

import asyncio
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from services.inference.config import WorkerSettings

console = Console(stderr=True)


def serve_worker(**overrides: Any) -> None:
    from services.cli import load_settings
    from services.common.log import configure_logging

    settings = load_settings(WorkerSettings, **overrides)
    assert isinstance(settings, WorkerSettings)
    configure_logging("worker", settings.log_level, settings.log_format)
    # After logging is set up: importing the model stack logs (torchao), and that must go through it.
    from services.inference.server import Worker, model_folder

    if settings.model != "smollm2":
        try:
            model_folder(settings.model)  # a typo fails here, before anything listens
        except ValueError as exc:
            console.print(f"[red]cannot start the worker[/red]: {escape(str(exc))}")
            raise typer.Exit(2) from None

    def ready(port: int) -> None:
        console.print(f"worker ready on {settings.host}:{port} (model {settings.model})")

    try:
        asyncio.run(Worker(settings).run(ready))
    except (OSError, ValueError, RuntimeError) as exc:  # a port in use, a model that cannot load
        console.print(f"[red]the worker stopped[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
