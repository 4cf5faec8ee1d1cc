from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.grpc_client import ClientTLS
from services.gateway.settings import GatewaySettings
from services.gateway.worker_addresses import DnsName, parse_workers


def test_worker_lists_and_dns_names_are_parsed() -> None:
    listed = parse_workers("10.0.0.1:50052, 10.0.0.2:50052,10.0.0.1:50052")
    assert listed == ["10.0.0.1:50052", "10.0.0.2:50052"]  # duplicates dropped, order kept
    assert parse_workers("[::1]:50052") == ["[::1]:50052"]
    assert parse_workers("dns:///workers.openlora.svc.cluster.local:50052") == DnsName(
        "workers.openlora.svc.cluster.local", 50052
    )


@pytest.mark.parametrize("spec", ["", " , ", "host", "host:port", "host:0", "dns:///name", "host:70000"])
def test_bad_worker_specs_name_the_entry(spec: str) -> None:
    with pytest.raises(ValueError, match="workers"):
        parse_workers(spec)


def test_defaults_are_sane() -> None:
    settings = GatewaySettings()
    assert settings.port == 50051
    assert settings.workers == "127.0.0.1:50052"
    assert settings.store_address == "127.0.0.1:50053"
    assert settings.load_factor == 1.25
    assert settings.max_attempts == 3


def test_settings_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="workers"):
        GatewaySettings(workers="nope")
    with pytest.raises(ValidationError, match="api_keys_file"):
        GatewaySettings(api_keys_file=tmp_path / "missing.json")
    with pytest.raises(ValidationError, match="load_factor"):
        GatewaySettings(load_factor=1.0)
    with pytest.raises(ValidationError, match="upstream_tls_cert_file"):
        GatewaySettings(upstream_tls_key_file=tmp_path / "x")
    assert GatewaySettings(store_address="").store_address is None  # empty turns the checks off


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENLORA_GATEWAY_WORKERS", "dns:///workers:50052")
    monkeypatch.setenv("OPENLORA_GATEWAY_LOAD_FACTOR", "2")
    settings = GatewaySettings()
    assert settings.workers == "dns:///workers:50052" and settings.load_factor == 2


def test_upstream_tls_names_the_certificates_workers_and_the_store_carry(tmp_path: Path) -> None:
    """Workers found by DNS are dialled by IP, so their certificates are checked against the Service's
    name, unless `upstream_tls_server_name` says otherwise; the store's channel uses the same setting."""
    from services.common.grpc_client import client_tls
    from services.gateway.membership import WorkerPool

    ca = tmp_path / "ca.pem"
    ca.write_text("unused by this test")
    dns = GatewaySettings(workers="dns:///openlora-worker.ns.svc:50052", upstream_tls_ca_file=ca)
    assert WorkerPool(dns, tls=client_tls(dns, "upstream")).tls == ClientTLS(
        ca, None, None, "openlora-worker.ns.svc"
    )
    named = GatewaySettings(
        workers="dns:///openlora-worker.ns.svc:50052",
        upstream_tls_ca_file=ca,
        upstream_tls_server_name="workers",
    )
    assert client_tls(named, "upstream") == ClientTLS(ca, None, None, "workers")
    assert WorkerPool(named, tls=client_tls(named, "upstream")).tls == ClientTLS(ca, None, None, "workers")
    listed = GatewaySettings(workers="10.0.0.1:50052", upstream_tls=True)
    assert WorkerPool(listed, tls=client_tls(listed, "upstream")).tls == ClientTLS(None, None, None, None)
