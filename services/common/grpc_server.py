"""The gRPC server kit every service is built on.

`GrpcServer` wraps a `grpc.aio` server with what production needs and no service should rewrite:
the standard health service (NOT_SERVING until the service says it is ready), server reflection,
the call interceptor (who may call what, request ids, error mapping, access log), OpenTelemetry
tracing, message-size
and keepalive limits, optional TLS/mTLS, and a graceful shutdown on SIGTERM/SIGINT: health flips to
NOT_SERVING, new calls are refused, in-flight calls (streams included) run to completion within the
grace period, then whatever is left is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from services.common.interceptors import InflightCalls, ServerCallInterceptor
from services.common.settings import ServiceSettings
from services.common.telemetry import server_interceptors
from services.common.trust.setup import server_authorizer

log = logging.getLogger("openlora.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to serve: its full proto name and how to attach its servicer."""

    name: str  # e.g. "openlora.v1.Inference"
    attach: Callable[[grpc.aio.Server], None]  # e.g. lambda s: add_InferenceServicer_to_server(impl, s)


def channel_options(settings: ServiceSettings) -> list[tuple[str, Any]]:
    """Options shared by servers and channels: message limits and keepalive."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(settings: ServiceSettings) -> list[tuple[str, Any]]:
    return [
        *channel_options(settings),
        # Accept peers' keepalive pings as often as every keepalive_timeout_s (they send one every
        # keepalive_time_s). The option is grpc's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
        # whose name does not say "recv": under the name that does, grpc ignored it and kept its
        # 5-minute default, so a stream quiet for two minutes (a client waiting, a long prefill) took
        # three pings as abuse and was dropped with GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.keepalive_timeout_s * 1000)),
        # A second process on the same port must fail loudly, not share the port.
        ("grpc.so_reuseport", 0),
    ]


def _server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class GrpcServer:
    """A started-on-demand gRPC server for one component (`gateway`, `worker`, `store`, `attribution`)."""

    def __init__(
        self,
        settings: ServiceSettings,
        services: Sequence[ServiceBinding],
        *,
        component: str,
        tracer_provider: TracerProvider | None = None,
        ready_on_start: bool = True,
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.component = component
        self.tracer_provider = tracer_provider
        self.ready_on_start = ready_on_start
        self.inflight = InflightCalls()
        # Raises NoServiceAuth (a ValueError) now, at construction, when callers cannot be told apart.
        self.authorizer = server_authorizer(settings, component)
        self.health = HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._drain_callbacks: list[Callable[[], None]] = []

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the drain starts, e.g. to end streams that never end by themselves
        (subscriptions) so the drain need not wait out its grace period for them."""
        self._drain_callbacks.append(callback)

    async def start(self) -> int:
        """Bind, start serving, and return the bound port."""
        server = grpc.aio.server(
            interceptors=[
                *server_interceptors(self.tracer_provider),
                ServerCallInterceptor(self.inflight, self.authorizer),
            ],
            options=server_options(self.settings),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        for binding in self.services:
            binding.attach(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [b.name for b in self.services]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        await self._set_status(NOT_SERVING)
        address = self.settings.address
        try:
            if self.settings.tls_enabled:
                port = server.add_secure_port(address, _server_credentials(self.settings))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises RuntimeError when the address cannot be bound
            raise OSError(f"{self.component}: cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise OSError(f"{self.component}: cannot listen on {address} (address in use?)")
        await server.start()
        self._server, self.port = server, port
        log.info(
            "%s listening on %s:%d",
            self.component,
            self.settings.host,
            port,
            extra={"tls": self.settings.tls_enabled, "mtls": self.settings.tls_client_ca_file is not None},
        )
        if self.ready_on_start:
            await self.set_ready(True)
        return port

    async def _set_status(self, status: Any) -> None:
        for name in ("", *(b.name for b in self.services)):
            await self.health.set(name, status)

    async def set_ready(self, ready: bool) -> None:
        """Report SERVING (ready for traffic) or NOT_SERVING through the health service."""
        await self._set_status(SERVING if ready else NOT_SERVING)

    def stop(self, grace: float | None = None) -> asyncio.Task[None]:
        """Begin a graceful stop (idempotent): in-flight calls get `grace` seconds (the settings'
        grace period by default); await the returned task to wait for it."""
        if self._stopping is None:
            grace_s = self.settings.grace_period_s if grace is None else grace
            self._stopping = asyncio.get_running_loop().create_task(self._drain_and_stop(grace_s))
        return self._stopping

    async def _drain_and_stop(self, grace_s: float) -> None:
        server = self._server
        if server is None:
            return
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_s > 0:
            log.info("not serving; waiting %.1fs for load balancers", self.settings.shutdown_delay_s)
            await asyncio.sleep(self.settings.shutdown_delay_s)
        # Our interceptor refuses new calls from here on; grpc's own stop(grace) would also wait for
        # health Watch streams, which never end by themselves, so drain only application calls.
        self.inflight.draining = True
        for callback in self._drain_callbacks:
            callback()
        if self.inflight.count:
            log.info("draining %d call(s), up to %.1fs", self.inflight.count, grace_s)
        finished = await self.inflight.wait_idle(grace_s)
        if not finished:
            log.warning("grace period over; cancelling %d call(s)", self.inflight.count)
        await server.stop(None)
        log.info("%s stopped", self.component)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping

    @contextlib.contextmanager
    def stopping_on_signals(self) -> Iterator[None]:
        """Within: SIGTERM or SIGINT begins the graceful stop instead of interrupting anything."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def serve_until_signal(self, on_started: Callable[[int], None] | None = None) -> None:
        """Start, run until SIGTERM or SIGINT, then stop gracefully (a bare server: a test double;
        services run through their `App`)."""
        with self.stopping_on_signals():
            port = await self.start()
            if on_started is not None:
                on_started(port)
            await self.wait_for_termination()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s; shutting down", sig.name)
        self.stop()
