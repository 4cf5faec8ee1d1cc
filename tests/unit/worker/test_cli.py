"""`openlora worker serve` refuses a bad configuration readably, before loading anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app

runner = CliRunner()


def test_a_missing_model_folder_is_a_readable_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["worker", "serve", "--model", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "no config.json" in result.output and "Traceback" not in result.output


def test_an_invalid_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENLORA_WORKER_LORA_SLOTS", "-1")
    result = runner.invoke(app, ["worker", "serve"])
    assert result.exit_code == 2
    assert "lora_slots" in result.output


def test_config_lists_the_worker_settings() -> None:
    result = runner.invoke(app, ["worker", "config"], terminal_width=250)
    assert result.exit_code == 0, result.output
    for env in ("OPENLORA_WORKER_MODEL", "OPENLORA_WORKER_METRICS_PORT", "OPENLORA_WORKER_SPOOL_DIR"):
        assert env in result.output
