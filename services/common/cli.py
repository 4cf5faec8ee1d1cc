"""What every service's command group shares: settings from the environment and flags with readable
errors, the `config` command, and `serve` running the service's app until a signal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.common.app import App
from services.common.errors import ServiceError
from services.common.settings import ServiceSettings, describe

console = Console(stderr=True)
S = TypeVar("S", bound=ServiceSettings)


def load_settings(settings_class: type[S], **overrides: object) -> S:
    """Settings from the environment plus CLI overrides; a readable error and exit 2 when invalid."""
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    try:
        return settings_class(**given)
    except ValidationError as exc:
        prefix = settings_class.model_config.get("env_prefix", "")
        console.print(f"[red]invalid configuration[/red] ({prefix}*):")
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            console.print(f"  {where}: {error['msg']}")
        raise typer.Exit(2) from None


def add_config_command(group: typer.Typer, settings_class: type[ServiceSettings]) -> None:
    """`<service> config`: the effective settings and the environment variable of each."""

    def config() -> None:
        """Print the effective settings and the environment variable of each."""
        settings = load_settings(settings_class)
        table = Table(title=settings_class.__doc__)
        table.add_column("env", no_wrap=True)  # an env name must stay copyable in one piece
        table.add_column("value", overflow="fold")
        table.add_column("description", overflow="fold")
        for row in describe(settings_class):
            table.add_row(row["env"], repr(getattr(settings, row["field"])), row["description"])
        Console().print(table)

    group.command("config")(config)


class _CannotStart(Exception):
    pass


def serve_app(component: str, build: Callable[[], App], ready: Callable[[App, int], str]) -> None:
    """Build the app inside the event loop that runs it (grpc.aio channels bind to it) and run it until
    SIGTERM/SIGINT. A service that cannot be built exits 2 for a configuration it refuses, 1 for a
    dependency it cannot reach; one that fails while running exits 1. Never a traceback."""

    async def main() -> None:
        try:
            app = build()
        except ValueError as exc:
            raise _CannotStart(str(exc), 2) from None
        except (ServiceError, OSError, RuntimeError) as exc:
            raise _CannotStart(str(exc), 1) from None
        await app.run(lambda port: console.print(ready(app, port)))

    try:
        asyncio.run(main())
    except _CannotStart as exc:
        message, code = exc.args
        console.print(f"[red]cannot start the {component}[/red]: {escape(message)}")
        raise typer.Exit(code) from None
    except (OSError, ValueError, RuntimeError) as exc:  # a port in use, a model that cannot load
        console.print(f"[red]the {component} stopped[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
