"""The gateway process: the public `Inference` and `AdapterStore` services on the common server kit.

Health reports SERVING while at least one worker is in rotation, so a load balancer in front of
several gateways skips one that has lost every worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, common_pb2
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from services.common.contracts import SERVICE_NAMES
from services.common.grpc_client import client_tls
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.metrics_http import MetricsEndpoint
from services.common.trust.setup import service_identity
from services.gateway.access import AdapterAccess
from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.keys import KeySource, TenantLimits
from services.gateway.limits import TenantLimiter
from services.gateway.membership import WorkerPool, upstream_channel
from services.gateway.metrics import GatewayMetrics
from services.gateway.relay import Relay
from services.gateway.servicer import GatewayInference, binding
from services.gateway.store_proxy import StoreProxy

log = logging.getLogger("openlora.gateway")

STORE_LOOKUP_TIMEOUT_S = 5.0


class Gateway:
    def __init__(self, settings: GatewaySettings, *, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        defaults = TenantLimits(settings.max_concurrent_streams, settings.tokens_per_minute)
        # An invalid key file or value is a start-up error (ValueError), not a silent lock-out.
        self.keys = KeySource(
            defaults,
            path=settings.api_keys_file,
            inline=settings.api_keys,
            reload_s=settings.api_keys_reload_s,
        )
        if not self.keys.ring.keys:
            log.warning("no API keys configured: every call will be refused UNAUTHENTICATED")
        tls = client_tls(settings, "upstream")
        identity = service_identity(settings, "gateway")
        self.pool = WorkerPool(
            settings,
            tls=tls,
            tracer_provider=tracer_provider,
            identity=identity,
            on_change=self._pool_changed,
        )
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry, lambda: list(self.pool.endpoints.values()))
        self.metrics_port: int | None = None
        self._metrics_http: MetricsEndpoint | None = None
        authenticate = Authenticator(self.keys)
        self.store_channel: grpc.aio.Channel | None = None
        access: AdapterAccess | None = None
        bindings: list[ServiceBinding] = []
        if settings.store_address:
            self.store_channel = upstream_channel(
                settings.store_address,
                settings,
                tls,
                tracer_provider,
                identity=identity,
                audience="store",
            )
            store = adapter_store_pb2_grpc.AdapterStoreStub(self.store_channel)

            async def fetch(adapter: common_pb2.AdapterRef) -> store_pb.AdapterInfo:
                info: store_pb.AdapterInfo = await store.Get(
                    store_pb.GetAdapterRequest(adapter=adapter), timeout=STORE_LOOKUP_TIMEOUT_S
                )
                return info

            access = AdapterAccess(fetch, settings.adapter_cache_s)
            proxy = StoreProxy(store, authenticate, self.metrics)
            bindings.append(
                ServiceBinding(
                    SERVICE_NAMES["adapter_store"],
                    lambda server: adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(proxy, server),
                )
            )
        else:
            log.warning("no adapter store: adapter ids are forwarded unchecked (single-tenant use only)")
        relay = Relay(
            self.pool,
            self.metrics,
            load_factor=settings.load_factor,
            max_attempts=settings.max_attempts,
            forward_trace_headers=tracer_provider is None,
        )
        inference = GatewayInference(
            authenticate=authenticate,
            keys=self.keys,
            limiter=TenantLimiter(),
            access=access,
            relay=relay,
            pool=self.pool,
            metrics=self.metrics,
        )
        bindings.insert(0, binding(inference))
        self.server = GrpcServer(
            settings, bindings, component="gateway", tracer_provider=tracer_provider, ready_on_start=False
        )
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pool_changed(self) -> None:
        if self._started:
            self._spawn(self.server.set_ready(self.pool.any_healthy()))

    def _start_metrics(self) -> None:
        if self.settings.metrics_port is None:
            return
        self._metrics_http = MetricsEndpoint(
            self.settings.metrics_host, self.settings.metrics_port, self.registry
        )
        self.metrics_port = self._metrics_http.port

    async def _after_listening(self) -> None:
        self._started = True
        await self.pool.start()
        await self.server.set_ready(self.pool.any_healthy())

    async def start(self) -> int:
        """Listen, then start watching workers; returns the bound port."""
        self._start_metrics()
        port = await self.server.start()
        await self._after_listening()
        return port

    async def run(self, on_started: Callable[[int], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain and close."""
        self._start_metrics()

        def started(port: int) -> None:
            self._spawn(self._after_listening())
            if on_started is not None:
                on_started(port)

        try:
            await self.server.serve_until_signal(on_started=started)
        finally:
            await self.close()

    async def stop(self) -> None:
        await self.server.stop()
        await self.close()

    async def close(self) -> None:
        await self.pool.close()
        if self.store_channel is not None:
            await self.store_channel.close()
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        await asyncio.gather(*self._tasks, return_exceptions=True)
