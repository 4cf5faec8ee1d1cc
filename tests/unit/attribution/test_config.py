"""Attribution settings: embedded SQLite default, env overrides, a docstring on every field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.attribution.settings import AttributionSettings


def test_default_ledger_is_a_sqlite_file_in_the_user_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = AttributionSettings()
    assert settings.database_url == f"sqlite:///{tmp_path}/openlora/attribution.sqlite3"
    assert settings.port == 50054


def test_env_overrides_and_exact_decimal_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENLORA_ATTRIBUTION_DATABASE_URL", "postgresql+psycopg://u@db/ledger")
    monkeypatch.setenv("OPENLORA_ATTRIBUTION_DEFAULT_COMPLETION_PRICE", "0.000002")
    monkeypatch.setenv("OPENLORA_ATTRIBUTION_STORE_ADDRESS", "store:50053")
    settings = AttributionSettings()
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.default_completion_price == Decimal("0.000002")
    assert settings.store_address == "store:50053"


@pytest.mark.parametrize(
    "overrides",
    [
        {"database_url": "mysql://x/y"},
        {"default_prompt_price": Decimal("-1")},
        {"default_prompt_price": Decimal("0.0000000000001")},  # finer than a pico
        {"max_batch_records": 0},
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AttributionSettings(**overrides)  # type: ignore[arg-type]


def test_every_field_is_documented() -> None:
    for name, field in AttributionSettings.model_fields.items():
        assert field.description, name
