"""Client channels between services, with the same limits, keepalive, TLS and tracing as the servers,
and the caller's service token on every call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider

from services.common.grpc_server import channel_options
from services.common.settings import ServiceSettings
from services.common.telemetry import client_interceptors
from services.common.trust.credentials import CallerIdentity, token_interceptors

DEFAULT_RECONNECT_S = (1.0, 5.0)


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials trusting `ca_file` (system roots when None), presenting a client cert for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )


@dataclass(frozen=True)
class ClientTLS:
    """How one hop reaches its server over TLS: whom to trust (a CA bundle, or the system's CAs),
    which certificate to present (mutual TLS), and the name the server's certificate must carry
    when it is not the host in the address."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca_file, self.cert_file, self.key_file)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(settings: Any, hop: str) -> ClientTLS | None:
    """The `{hop}_tls*` settings of one upstream (`store`, `attribution`, `upstream`); None for plaintext."""
    ca_file = getattr(settings, f"{hop}_tls_ca_file")
    if not (getattr(settings, f"{hop}_tls") or ca_file is not None):
        return None
    return ClientTLS(
        ca_file,
        getattr(settings, f"{hop}_tls_cert_file"),
        getattr(settings, f"{hop}_tls_key_file"),
        getattr(settings, f"{hop}_tls_server_name"),
    )


def open_channel(
    target: str,
    settings: ServiceSettings | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    tls: ClientTLS | None = None,
    tracer_provider: TracerProvider | None = None,
    identity: CallerIdentity | None = None,
    audience: str | None = None,
    reconnect_s: tuple[float, float] | None = None,
    client_streams: bool = True,
) -> grpc.aio.Channel:
    """An asyncio channel to `target` (`host:port` or `dns:///name:port`); TLS when `tls` (or raw
    `credentials`) is given. With an `identity`, every call carries its service token for `audience`,
    the component called (`worker`, `store`, `attribution`); `client_streams=False` leaves the
    token off client-streaming calls whose caller sends it as metadata itself (the relay).
    `reconnect_s` (first, longest) bounds the reconnect backoff, 1 to 5 s by default: grpc would grow
    it to 120 s, so a store restarted after a minute's outage went unnoticed for up to two more."""
    # Defaults without reading the environment: a client is configured by the service that owns it.
    options = channel_options(settings or ServiceSettings.model_construct())
    first_ms, longest_ms = (int(s * 1000) for s in reconnect_s or DEFAULT_RECONNECT_S)
    options += [
        ("grpc.initial_reconnect_backoff_ms", first_ms),
        ("grpc.min_reconnect_backoff_ms", first_ms),
        ("grpc.max_reconnect_backoff_ms", longest_ms),
    ]
    if tls is not None:
        credentials = tls.credentials()
        options += tls.options()
    interceptors: list[Any] = list(client_interceptors(tracer_provider))
    if identity is not None:
        if audience is None:
            raise ValueError("a channel presenting a service identity needs the component it calls")
        interceptors += token_interceptors(identity, audience, client_streams=client_streams)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


async def health_status(channel: grpc.aio.Channel, service: str = "", timeout: float = 5.0) -> str:
    """The health status name (`SERVING`, `NOT_SERVING`, ...) a server reports for `service`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def reflected_services(channel: grpc.aio.Channel, timeout: float = 5.0) -> list[str]:
    """Names of the services a server lists through server reflection."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=timeout)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    names: list[str] = []
    async for response in call:
        names.extend(s.name for s in response.list_services_response.service)
    return sorted(names)
