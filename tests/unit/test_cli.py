from __future__ import annotations

import pytest
from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def test_help_lists_every_service() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("gateway", "worker", "store", "attribution", "demo"):
        assert name in result.output


@pytest.mark.parametrize("service", ["gateway", "worker", "store", "attribution"])
def test_config_shows_env_names(service: str) -> None:
    result = runner.invoke(app, [service, "config"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"OPENLORA_{service.upper()}_PORT" in result.output


def test_invalid_env_is_a_readable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENLORA_STORE_PORT", "not-a-port")
    result = runner.invoke(app, ["store", "config"])
    assert result.exit_code == 2
    assert "port" in result.output and "Traceback" not in result.output
