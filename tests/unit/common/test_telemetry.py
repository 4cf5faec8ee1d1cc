from __future__ import annotations

import pytest

from services.common.telemetry import client_interceptors, resolve_mode, server_interceptors, setup_telemetry


def test_auto_exports_over_otlp_only_when_an_endpoint_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert resolve_mode("auto") == "off"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")
    assert resolve_mode("auto") == "otlp"
    assert resolve_mode("console") == "console"


def test_off_installs_nothing() -> None:
    assert setup_telemetry("gateway", "off") is None
    assert server_interceptors(None) == [] and client_interceptors(None) == []


def test_otlp_provider_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")  # nothing listens; export is lazy
    provider = setup_telemetry("store", "otlp")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "openlora-store"
        assert len(server_interceptors(provider)) == 1
    finally:
        provider.shutdown()
