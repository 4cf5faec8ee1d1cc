"""Settings shared by every service: where it listens and how its gRPC server behaves.

Each service subclasses `ServiceSettings` with its own env prefix (`OPENLORA_GATEWAY_`, `OPENLORA_WORKER_`,
...) and its own fields. Every field carries a docstring: it is the field's description, shown by
`openlora <service> config` and used for the README's configuration reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.trust.tokens import load_secret

MiB = 1024 * 1024

#: A TCP port; 0 asks the OS for a free one.
Port = Annotated[int, Field(ge=0, le=65535)]


class ServiceSettings(BaseSettings):
    """Settings of one service's gRPC server, logging and telemetry."""

    model_config = SettingsConfigDict(
        env_prefix="OPENLORA_", use_attribute_docstrings=True, extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default; `0.0.0.0` or `[::]` to accept other hosts (Kubernetes)."""

    port: Port = 50050
    """TCP port to listen on; 0 picks a free port (printed at start-up)."""

    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus `/metrics` endpoint (`0.0.0.0` to let a scraper on another host in)."""

    metrics_port: Port | None = None
    """Port of the Prometheus `/metrics` endpoint (process CPU, memory and open files, plus the
    service's own metrics); 0 picks a free port; None, the store's and attribution's default, turns
    it off."""

    grace_period_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight calls may run to completion before they are cancelled."""

    shutdown_delay_s: float = Field(default=0.0, ge=0)
    """On SIGTERM, how long to keep serving while health reports NOT_SERVING, so load balancers
    (a Kubernetes Service, the gateway) stop routing here before new calls are refused."""

    max_message_bytes: int = Field(default=64 * MiB, ge=4096)
    """Largest gRPC message sent or received. Adapter transfers stream in chunks far below this."""

    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    """Calls served at once (on a worker, streams relayed from gateways count too); beyond this new
    calls get RESOURCE_EXHAUSTED. None means unbounded."""

    keepalive_time_s: float = Field(default=30.0, gt=0)
    """Interval of HTTP/2 keepalive pings, so dead peers and idle-killing proxies are noticed."""

    keepalive_timeout_s: float = Field(default=10.0, gt=0)
    """How long a keepalive ping may go unanswered before the connection is closed."""

    tls_cert_file: Path | None = None
    """PEM certificate chain of this server. With `tls_key_file`, the server speaks TLS only."""

    tls_key_file: Path | None = None
    """PEM private key matching `tls_cert_file`."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""

    service_secret_file: Path | None = None
    """File holding the cluster's shared secret (at least 32 bytes; `openlora secret new` prints one).
    The service signs the short-lived tokens it presents to the other services with it and checks
    those presented to it against the role table (see the README's security section). `openlora up`
    makes one per cluster. A worker, store or attribution service with neither this nor mutual TLS
    refuses to start unless `open_rpcs` is set."""

    open_rpcs: bool = False
    """Serve the service-to-service RPCs to any caller without asking who it is. For development on
    a closed machine only: a warning is logged at start-up. Not used by the gateway, whose public API
    always takes API keys."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Lowest level of log records written."""

    log_format: Literal["auto", "json", "text"] = "auto"
    """`json` writes one JSON object per line (for log collectors); `text` is for people; `auto`
    picks text on a terminal and JSON otherwise."""

    telemetry: Literal["auto", "otlp", "console", "off"] = "auto"
    """Trace export. `auto` exports over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT (or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set and is off otherwise; the standard OTEL_* variables
    configure the exporter."""

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "service_secret_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if self.service_secret_file is not None:
            load_secret(self.service_secret_file)  # ValueError naming the file when it is too short
        if self.keepalive_timeout_s >= self.keepalive_time_s:
            raise ValueError("keepalive_timeout_s must be shorter than keepalive_time_s")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def check_client_tls(settings: BaseSettings, hop: str) -> None:
    """The `{hop}_tls*` fields of one upstream: key and certificate together, files that exist."""
    cert, key = getattr(settings, f"{hop}_tls_cert_file"), getattr(settings, f"{hop}_tls_key_file")
    if (cert is None) != (key is None):
        raise ValueError(f"{hop}_tls_cert_file and {hop}_tls_key_file must be set together")
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(settings, f"{hop}_tls_{name}")
        if path is not None and not path.is_file():
            raise ValueError(f"{hop}_tls_{name}: no such file: {path}")


class StoreClientTLS(BaseSettings):
    """How a service that calls the adapter store (a worker, attribution) reaches it over TLS."""

    model_config = SettingsConfigDict(use_attribute_docstrings=True, extra="forbid")

    store_tls: bool = False
    """Connect to the adapter store over TLS, trusting the system's CAs unless `store_tls_ca_file`
    names others. On as soon as a CA file is set."""

    store_tls_ca_file: Path | None = None
    """PEM CA bundle that signed the adapter store's certificate (TLS on)."""

    store_tls_cert_file: Path | None = None
    """PEM client certificate presented to the adapter store (mutual TLS; its common name is this
    service's role)."""

    store_tls_key_file: Path | None = None
    """PEM private key of `store_tls_cert_file`."""

    store_tls_server_name: str | None = None
    """Name the adapter store's certificate must carry, when it is not the host in the address."""

    @model_validator(mode="after")
    def _check_store_tls(self) -> Self:
        check_client_tls(self, "store")
        return self


def describe(settings_class: type[BaseSettings]) -> list[dict[str, Any]]:
    """One row per field: env variable, type, default and description (for docs and `config` commands)."""
    prefix = settings_class.model_config.get("env_prefix", "")
    rows = []
    for name, field in settings_class.model_fields.items():
        rows.append(
            {
                "field": name,
                "env": f"{prefix}{name}".upper(),
                "type": _type_name(field.annotation),
                "default": field.default,
                "description": " ".join((field.description or "").split()),
            }
        )
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("pathlib.", "")
