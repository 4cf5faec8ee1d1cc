"""Settings of the gateway (`openlora gateway serve`, env prefix `OPENLORA_GATEWAY_`)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import Port, ServiceSettings, check_client_tls
from services.gateway.worker_addresses import parse_workers


class GatewaySettings(ServiceSettings):
    """Settings of the gateway (`openlora gateway serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_GATEWAY_")

    port: Port = 50051
    """TCP port clients connect to; 0 picks a free port."""

    http_port: Port | None = 8000
    """Port of the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/completions`,
    `/v1/models`, `/health`), on `host`, with the same API keys, limits and TLS certificate as the
    gRPC API; 0 picks a free port; None turns it off."""

    http_request_timeout_s: float | None = Field(default=600.0, gt=0)
    """Longest an HTTP generation may run (HTTP clients send no deadline; gRPC clients' own deadlines
    apply to theirs); None means no limit."""

    workers: str = "127.0.0.1:50052"
    """Inference workers: a comma-separated `host:port` list, or `dns:///name:port` (every address
    the name resolves to, re-resolved every `dns_refresh_s`; a Kubernetes headless Service)."""

    dns_refresh_s: float = Field(default=10.0, gt=0)
    """How often a `dns:///` worker name is resolved again to pick up added and removed workers."""

    store_address: str | None = "127.0.0.1:50053"
    """Adapter store `host:port`. The gateway checks each adapter's owner and visibility there (a
    tenant sees public adapters and its own private ones) and proxies the tenant-facing store API.
    Empty turns both off: adapter ids are then forwarded unchecked (single-tenant setups only)."""

    api_keys_file: Path | None = None
    """JSON file of hashed API keys and tenant limits (format: `openlora gateway` docs; a mounted
    Kubernetes Secret works as is). Re-read when it changes, so a revoked key stops working within
    `api_keys_reload_s` without a restart."""

    api_keys: str | None = None
    """The same JSON inline (for an env variable filled from a Secret). Merged with the file's keys."""

    api_keys_reload_s: float = Field(default=5.0, gt=0)
    """How often the key file is checked for changes."""

    max_concurrent_streams: int = Field(default=64, ge=1)
    """Default per-tenant limit of Generate streams open at once (a tenant entry may override it).
    Limits are kept by each gateway instance: with N replicas a tenant may reach N times them."""

    tokens_per_minute: int = Field(default=0, ge=0)
    """Default per-tenant token rate (prompt + completion tokens, a bucket holding one minute's
    worth); 0 means unlimited. Refusals carry a RetryInfo saying when the bucket has refilled."""

    load_factor: float = Field(default=1.25, gt=1.0)
    """Bounded-load factor c: an adapter's preferred worker is skipped while its in-flight count
    is above c x the mean in-flight of the healthy workers (counting the new request)."""

    max_attempts: int = Field(default=3, ge=1)
    """Workers tried for one request when it fails before its first chunk (the first try included)."""

    worker_retry_s: float = Field(default=1.0, gt=0)
    """First delay before a worker that failed (or whose health watch broke) is probed again;
    doubles up to `worker_retry_max_s`."""

    worker_retry_max_s: float = Field(default=10.0, gt=0)
    """Longest delay between probes of a failed worker."""

    adapter_cache_s: float = Field(default=10.0, ge=0)
    """How long an adapter's owner and visibility, read from the store, are reused before being
    read again (also how long a changed visibility may take to apply). While the store is down,
    the last answer keeps being used so cached adapters keep serving."""

    upstream_tls: bool = False
    """Connect to the workers and the store over TLS, trusting the system's CAs unless
    `upstream_tls_ca_file` names others. On as soon as a CA file is set."""

    upstream_tls_ca_file: Path | None = None
    """PEM CA bundle that signed the workers' and the store's certificates. When set, the gateway
    connects to them over TLS (for a `dns:///` name, certificates must carry that name)."""

    upstream_tls_cert_file: Path | None = None
    """PEM client certificate the gateway presents to workers and the store (mutual TLS)."""

    upstream_tls_key_file: Path | None = None
    """PEM private key of `upstream_tls_cert_file`."""

    upstream_tls_server_name: str | None = None
    """Name the workers' and the store's certificates must carry, when it is not the host in their
    addresses (e.g. every worker's certificate names the headless Service)."""

    metrics_port: Port | None = 9465
    """Port of the Prometheus `/metrics` endpoint, on by default for the gateway's metrics; 0 picks
    a free port; None turns it off."""

    @model_validator(mode="after")
    def _check_gateway(self) -> Self:
        parse_workers(self.workers)  # raises ValueError naming the bad entry
        if self.worker_retry_max_s < self.worker_retry_s:
            raise ValueError("worker_retry_max_s must not be shorter than worker_retry_s")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file: no such file: {self.api_keys_file}")
        check_client_tls(self, "upstream")
        if self.store_address == "":
            self.store_address = None
        return self
