"""`App`: what every service process is made of and how it starts and stops, written once.

Each service's `app.py` has `build(settings) -> <Service>App`, a subclass that attaches its gRPC
services and its parts. The base owns what they share: the server kit (health, reflection, the role
table, graceful drain), the service's telemetry, its Prometheus endpoint and registry, and its
upstream channels, all opened through the one channel factory and closed with the app.

    app = build(settings)          # inside the event loop that will run it (grpc.aio binds to it)
    port = await app.start()       # listening; `await app.wait_ready()` for the slow part, if any
    await app.stop(grace=5)        # drain in-flight calls up to `grace` seconds, then release all
    await app.run(on_ready)        # or all of it until SIGTERM/SIGINT (what `<service> serve` does)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, ProcessCollector

from services.common.grpc_client import client_tls, open_channel
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.metrics_http import MetricsEndpoint
from services.common.settings import ServiceSettings
from services.common.telemetry import setup_telemetry
from services.common.trust.setup import service_identity


class App:
    component: str
    """`gateway`, `worker`, `store` or `attribution`: names its logs, spans, metrics and identity."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        tracer_provider: TracerProvider | None = None,
        ready_on_start: bool = True,
    ) -> None:
        """`tracer_provider` replaces the one `settings.telemetry` would set up (tests, embedding)."""
        self.settings = settings
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU seconds, resident memory, open files
        self._own_provider = tracer_provider is None  # shut down at close only if made here
        self.tracer_provider = tracer_provider or setup_telemetry(self.component, settings.telemetry)
        # The global provider when telemetry is off: a no-op unless the embedding process set one.
        self.tracer = (self.tracer_provider or trace.get_tracer_provider()).get_tracer(
            f"openlora.{self.component}"
        )
        self.server = GrpcServer(
            settings,
            [],
            component=self.component,
            tracer_provider=self.tracer_provider,
            ready_on_start=ready_on_start,
        )
        self.metrics_port: int | None = None
        self.failure: BaseException | None = None
        """What made the service fail after it started; `run()` raises it once drained."""
        self._metrics_http: MetricsEndpoint | None = None
        self._channels: list[grpc.aio.Channel] = []
        self._closed = False

    @property
    def port(self) -> int | None:
        return self.server.port

    def serve(self, bindings: Sequence[ServiceBinding]) -> None:
        """Add gRPC services to what `start()` will serve."""
        self.server.services.extend(bindings)

    def upstream(
        self,
        address: str,
        *,
        audience: str,
        hop: str | None = None,
        reconnect_s: tuple[float, float] | None = None,
        client_streams: bool = True,
    ) -> grpc.aio.Channel:
        """A channel to another service (`audience`: worker, store, attribution), with this service's
        identity, the TLS settings of `hop` (the `<hop>_tls_*` settings; `audience` by default) and
        its tracing; closed with the app."""
        channel = open_channel(
            address,
            self.settings,
            tls=client_tls(self.settings, hop or audience),
            tracer_provider=self.tracer_provider,
            identity=service_identity(self.settings, self.component),
            audience=audience,
            reconnect_s=reconnect_s,
            client_streams=client_streams,
        )
        self._channels.append(channel)
        return channel

    async def start(self) -> int:
        """Listen and start the service's own parts; the bound port."""
        if self.settings.metrics_port is not None:
            self._metrics_http = MetricsEndpoint(
                self.settings.metrics_host, self.settings.metrics_port, self.registry
            )
            self.metrics_port = self._metrics_http.port
        port = await self.server.start()
        await self.on_listening(port)
        return port

    async def on_listening(self, port: int) -> None:
        """Start what needs the server up (the worker's model load, the gateway's worker watch)."""

    async def wait_ready(self) -> None:
        """Wait until the service serves (immediate unless it loads something slow); raises what
        made that fail."""
        if self.failure is not None:
            raise self.failure

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight calls for up to `grace` seconds (the settings' grace period by default),
        then release everything."""
        await self.server.stop(grace)
        await self.close()

    async def run(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT (or a failure), then drain and close; raises the failure."""
        try:
            with self.server.stopping_on_signals():
                port = await self.start()
                try:
                    await self.wait_ready()
                except Exception as exc:
                    self.fail(exc)
                else:
                    if on_ready is not None:
                        on_ready(port)
                await self.server.wait_for_termination()
        finally:
            await self.close()
        if self.failure is not None:
            raise self.failure

    def fail(self, exc: BaseException) -> None:
        """Stop serving because of `exc`: the process then exits non-zero, so its orchestrator acts."""
        if self.failure is None:
            self.failure = exc
        self.server.stop()

    async def release(self) -> None:
        """Release the service's own parts (engine, caches, pools), before its channels close."""

    async def close(self) -> None:
        """Release everything `start()` began (idempotent)."""
        if self._closed:
            return
        self._closed = True
        await self.server.stop()  # at once when it already stopped (or never started)
        await self.release()
        await asyncio.gather(*(channel.close() for channel in self._channels))
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        if self.tracer_provider is not None and self._own_provider:
            self.tracer_provider.shutdown()  # flushes spans still batched for export
