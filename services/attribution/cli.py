"""`openlora attribution …`: run the service, migrate its ledger, and look at usage and rewards.

    openlora attribution serve [--port N] [--database-url URL]
    openlora attribution config
    openlora attribution migrate [--revision ID] [--downgrade]
    openlora attribution rewards show --contributor alice [--since 2026-01-01T00:00]
    openlora attribution usage show --adapter alpha [--bucket-minutes 60]

`rewards_app` and `usage_app` are also meant for the top level (`openlora rewards show …`). The two
`show` commands read the ledger database directly (they are this service's own tools).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.attribution.domain import MICROS_PER_UNIT, US_PER_MINUTE, format_amount
from services.attribution.settings import AttributionSettings
from services.common.cli import add_config_command, load_settings, serve_app

# SQLAlchemy and Alembic are imported inside the commands that use them, so `openlora --help`
# (which imports this module) stays fast.

app = typer.Typer(help="Usage ledger, provenance, rewards.", no_args_is_help=True)
rewards_app = typer.Typer(help="Rewards earned by contributors.", no_args_is_help=True)
usage_app = typer.Typer(help="Tokens used, per adapter and tenant.", no_args_is_help=True)
add_config_command(app, AttributionSettings)
app.add_typer(rewards_app, name="rewards")
app.add_typer(usage_app, name="usage")
err = Console(stderr=True)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(help="Ledger database URL (default: OPENLORA_ATTRIBUTION_DATABASE_URL or SQLite)."),
]
Since = Annotated[str | None, typer.Option(help="Inclusive start, ISO 8601 (UTC when no zone is given).")]
Until = Annotated[str | None, typer.Option(help="Exclusive end, ISO 8601.")]


def _micros(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        err.print(f"[red]--{option}[/red]: not an ISO 8601 time: {text!r}")
        raise typer.Exit(2) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def _clock(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1_000_000, UTC).strftime("%Y-%m-%d %H:%M")


def _ledger(database_url: str | None) -> Any:
    from services.attribution import db

    settings = load_settings(AttributionSettings, database_url=database_url)
    engine = db.make_engine(settings.database_url, pool_size=1)
    if db.current_revision(engine) != db.head_revision():
        err.print("[red]the ledger schema is not current[/red]: run `openlora attribution migrate`")
        raise typer.Exit(1)
    return engine


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port to listen on (0: any free port).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    database_url: DatabaseUrl = None,
    store_address: Annotated[str | None, typer.Option(help="Adapter store host:port for provenance.")] = None,
) -> None:
    """Run the attribution service until SIGTERM/SIGINT (every setting: `openlora attribution config`)."""
    from services.attribution.app import build
    from services.common.log import configure_logging

    settings = load_settings(
        AttributionSettings, port=port, host=host, database_url=database_url, store_address=store_address
    )
    configure_logging("attribution", settings.log_level, settings.log_format)
    serve_app(
        "attribution service",
        lambda: build(settings),
        lambda _, port: f"attribution listening on {settings.host}:{port}",
    )


@app.command()
def migrate(
    revision: Annotated[
        str, typer.Option(help="Target revision: `head`, an ID, or `base` with --downgrade.")
    ] = "head",
    downgrade: Annotated[
        bool, typer.Option(help="Migrate down to --revision (`base` drops the ledger).")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Upgrade the ledger schema to the newest revision (or downgrade it)."""
    from services.attribution import db

    settings = load_settings(AttributionSettings, database_url=database_url)
    engine = db.make_engine(settings.database_url, pool_size=1)
    try:
        before = db.current_revision(engine)
        (db.downgrade if downgrade else db.upgrade)(engine, revision)
        typer.echo(f"ledger schema: {before or 'empty'} -> {db.current_revision(engine) or 'empty'}")
    finally:
        engine.dispose()


@rewards_app.command("show")
def rewards_show(
    contributor: Annotated[str, typer.Option(help="Contributor id; empty for everyone.")] = "",
    adapter: Annotated[str, typer.Option(help="Only this adapter.")] = "",
    tenant: Annotated[str, typer.Option(help="Only usage by this tenant.")] = "",
    since: Since = None,
    until: Until = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Rewards per contributor and adapter, with the total."""
    from services.attribution import queries

    engine = _ledger(database_url)
    window = queries.TimeRange(_micros("since", since), _micros("until", until))
    try:
        result = queries.rewards(
            engine, contributor_id=contributor, adapter_id=adapter, tenant=tenant, window=window
        )
    finally:
        engine.dispose()
    currency = load_settings(AttributionSettings, database_url=database_url).currency
    table = Table(title=f"rewards ({currency})")
    for column in ("contributor", "adapter", "tokens", "amount"):
        table.add_column(column, justify="right" if column in ("tokens", "amount") else "left")
    for line in result.lines:
        tokens = f"{line.tokens_micros / MICROS_PER_UNIT:,.2f}"
        table.add_row(
            line.contributor_id or "(unattributed)", line.adapter_id, tokens, format_amount(line.amount_picos)
        )
    table.add_section()
    table.add_row("total", "", "", format_amount(result.total_picos))
    Console().print(table)


@usage_app.command("show")
def usage_show(
    adapter: Annotated[str, typer.Option(help="Adapter id; empty for every token.")] = "",
    tenant: Annotated[str, typer.Option(help="Only this tenant.")] = "",
    since: Since = None,
    until: Until = None,
    bucket_minutes: Annotated[int, typer.Option(min=1, help="Width of each row, in minutes.")] = 60,
    database_url: DatabaseUrl = None,
) -> None:
    """Prompt and completion tokens per time bucket, with the totals."""
    from services.attribution import queries

    engine = _ledger(database_url)
    window = queries.TimeRange(
        _micros("since", since), _micros("until", until), bucket_minutes * US_PER_MINUTE
    )
    try:
        result = queries.usage(engine, adapter_id=adapter, tenant=tenant, window=window)
    finally:
        engine.dispose()
    table = Table(title=f"usage of {adapter or 'all adapters'}" + (f" by {tenant}" if tenant else ""))
    for column in ("from (UTC)", "prompt tokens", "completion tokens"):
        table.add_column(column, justify="left" if column.startswith("from") else "right")
    for bucket in result.buckets:
        assert bucket.start_us is not None
        table.add_row(_clock(bucket.start_us), f"{bucket.prompt_tokens:,}", f"{bucket.completion_tokens:,}")
    table.add_section()
    table.add_row("total", f"{result.totals.prompt_tokens:,}", f"{result.totals.completion_tokens:,}")
    Console().print(table)


if __name__ == "__main__":
    app()
