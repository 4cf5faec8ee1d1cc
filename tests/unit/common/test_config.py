from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.adapter_store.settings import StoreSettings
from services.attribution.settings import AttributionSettings
from services.common.settings import ServiceSettings, describe
from services.gateway.settings import GatewaySettings
from services.inference.settings import WorkerSettings

SERVICE_SETTINGS = [GatewaySettings, WorkerSettings, StoreSettings, AttributionSettings]


@pytest.mark.parametrize("settings_class", SERVICE_SETTINGS)
def test_every_field_is_documented(settings_class: type[ServiceSettings]) -> None:
    rows = describe(settings_class)
    assert rows, settings_class
    undocumented = [r["field"] for r in rows if len(r["description"]) < 10]
    assert not undocumented


@pytest.mark.parametrize(
    ("settings_class", "prefix", "port"),
    [
        (GatewaySettings, "OPENLORA_GATEWAY_", 50051),
        (WorkerSettings, "OPENLORA_WORKER_", 50052),
        (StoreSettings, "OPENLORA_STORE_", 50053),
        (AttributionSettings, "OPENLORA_ATTRIBUTION_", 50054),
    ],
)
def test_each_service_reads_its_own_env_prefix(
    settings_class: type[ServiceSettings], prefix: str, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_class().port == port
    monkeypatch.setenv(f"{prefix}PORT", "6000")
    monkeypatch.setenv(f"{prefix}LOG_LEVEL", "DEBUG")
    settings = settings_class()
    assert (settings.port, settings.log_level) == (6000, "DEBUG")
    assert {r["env"] for r in describe(settings_class)} >= {f"{prefix}PORT", f"{prefix}HOST"}


def test_default_ports_do_not_collide() -> None:
    assert len({cls().port for cls in SERVICE_SETTINGS}) == len(SERVICE_SETTINGS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 70000}, "less than or equal"),
        ({"grace_period_s": -1}, "greater than or equal"),
        ({"log_level": "LOUD"}, "DEBUG"),
        ({"keepalive_time_s": 5, "keepalive_timeout_s": 10}, "keepalive_timeout_s"),
        ({"unknown_knob": 1}, "Extra inputs"),
    ],
)
def test_bad_values_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GatewaySettings(**overrides)  # type: ignore[arg-type]


def test_tls_files_are_checked_together(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    with pytest.raises(ValidationError, match="set together"):
        GatewaySettings(tls_cert_file=cert)
    with pytest.raises(ValidationError, match="needs tls_cert_file"):
        GatewaySettings(tls_client_ca_file=cert)
    with pytest.raises(ValidationError, match="no such file"):
        GatewaySettings(tls_cert_file=cert, tls_key_file=tmp_path / "missing.pem")
    assert GatewaySettings(tls_cert_file=cert, tls_key_file=key).tls_enabled
