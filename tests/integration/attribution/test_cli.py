"""`openlora attribution migrate | rewards show | usage show` on PostgreSQL and SQLite."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.attribution import db, validation
from services.attribution.cli import app
from services.attribution.domain import Contributor, Provenance, Role
from services.attribution.service import AttributionService
from tests.integration.attribution.wire import T0, attribution_settings, batch, request_tokens

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args), terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


async def test_migrate_then_show_rewards_and_usage(ledger_url: str) -> None:
    assert f"empty -> {db.head_revision()}" in invoke("migrate", "--database-url", ledger_url)
    settings = attribution_settings(ledger_url)
    engine = db.make_engine(ledger_url)
    try:
        service = AttributionService(engine, settings)
        await service.register_provenance(
            Provenance(
                "alpha",
                "v1",
                "",
                (),
                (Contributor("alice", Role.TRAINER, 800_000), Contributor("bob", Role.DATA, 200_000)),
            )
        )
        await service.set_price("alpha", 0, 10**10)  # 0.01 per completion token
        message = batch(
            1, request_tokens("r", prompt=5, completion=50, adapters=(("alpha", "v1", 1.0),), at=T0 + 30)
        )
        await service.ingest(
            validation.usage_batch(message, max_records=100, max_token_index=100, max_future_us=0)
        )
    finally:
        engine.dispose()

    rewards = invoke("rewards", "show", "--contributor", "alice", "--database-url", ledger_url)
    assert "alice" in rewards and "0.4" in rewards and "bob" not in rewards  # 50 × 0.01 × 0.8
    everyone = invoke("rewards", "show", "--database-url", ledger_url)
    assert "bob" in everyone and "0.5" in everyone
    usage = invoke(
        "usage", "show", "--adapter", "alpha", "--bucket-minutes", "5", "--database-url", ledger_url
    )
    assert "2026-01-01 00:00" in usage and "50" in usage and "5" in usage
    later = invoke("usage", "show", "--since", "2026-01-01T00:01", "--database-url", ledger_url)
    assert "2026-01-01 00:00" not in later

    assert f"{db.head_revision()} -> empty" in invoke(
        "migrate", "--downgrade", "--revision", "base", "--database-url", ledger_url
    )


@pytest.mark.parametrize("command", [["rewards", "show"], ["usage", "show"]])
def test_show_on_an_unmigrated_ledger_says_what_to_do(ledger_url: str, command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--database-url", ledger_url])
    assert result.exit_code == 1
    assert "openlora attribution migrate" in result.output
