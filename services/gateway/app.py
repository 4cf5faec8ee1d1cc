"""The gateway process: the public `Inference` and `AdapterStore` services on the common server kit.

Health reports SERVING while at least one worker is in rotation, so a load balancer in front of
several gateways skips one that has lost every worker.
"""

from __future__ import annotations

import asyncio
import logging

from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, common_pb2
from opentelemetry.sdk.trace import TracerProvider

from services.common.app import App
from services.common.contracts import SERVICE_NAMES
from services.common.grpc_client import client_tls
from services.common.grpc_server import ServiceBinding
from services.common.trust.setup import service_identity
from services.gateway.access import AdapterAccess
from services.gateway.auth import Authenticator
from services.gateway.http.routes import OpenAIFront, build_app
from services.gateway.http.server import HttpServer
from services.gateway.keys import KeySource, TenantLimits
from services.gateway.limits import TenantLimiter
from services.gateway.membership import WorkerPool
from services.gateway.metrics import GatewayMetrics
from services.gateway.relay import Relay
from services.gateway.servicer import GatewayInference, binding
from services.gateway.settings import GatewaySettings
from services.gateway.store_proxy import StoreProxy

log = logging.getLogger("openlora.gateway")

STORE_LOOKUP_TIMEOUT_S = 5.0


class GatewayApp(App):
    component = "gateway"

    def __init__(self, settings: GatewaySettings, *, tracer_provider: TracerProvider | None = None) -> None:
        # Health reports SERVING only while a worker is in rotation (set once the pool is watched).
        super().__init__(settings, tracer_provider=tracer_provider, ready_on_start=False)
        self.settings: GatewaySettings = settings
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
        self.pool = WorkerPool(
            settings,
            tls=client_tls(settings, "upstream"),
            tracer_provider=self.tracer_provider,
            identity=service_identity(settings, "gateway"),
            on_change=self._pool_changed,
        )
        self.metrics = GatewayMetrics(self.registry, lambda: list(self.pool.endpoints.values()))
        authenticate = Authenticator(self.keys)
        access: AdapterAccess | None = None
        proxy: StoreProxy | None = None
        store_bindings: list[ServiceBinding] = []
        if settings.store_address:
            channel = self.upstream(
                settings.store_address,
                audience="store",
                hop="upstream",
                reconnect_s=(settings.worker_retry_s, settings.worker_retry_max_s),
            )
            store = adapter_store_pb2_grpc.AdapterStoreStub(channel)

            async def fetch(adapter: common_pb2.AdapterRef) -> store_pb.AdapterInfo:
                info: store_pb.AdapterInfo = await store.Get(
                    store_pb.GetAdapterRequest(adapter=adapter), timeout=STORE_LOOKUP_TIMEOUT_S
                )
                return info

            access = AdapterAccess(fetch, settings.adapter_cache_s)
            proxy = StoreProxy(store, authenticate, self.metrics)
            store_bindings.append(
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
            forward_trace_headers=self.tracer_provider is None,
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
        self.serve([binding(inference), *store_bindings])
        self.http: HttpServer | None = None
        if settings.http_port is not None:
            front = OpenAIFront(
                inference,
                authenticate,
                self.metrics,
                proxy,
                request_timeout_s=settings.http_request_timeout_s,
            )
            self.http = HttpServer(
                build_app(front),
                settings.host,
                settings.http_port,
                cert_file=settings.tls_cert_file,
                key_file=settings.tls_key_file,
                grace_s=settings.grace_period_s,
            )
        self._watching = False
        self._tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    def _pool_changed(self) -> None:
        if self._watching:
            task = asyncio.get_running_loop().create_task(self.server.set_ready(self.pool.any_healthy()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def on_listening(self, port: int) -> None:
        """Watch the workers (SERVING as soon as one of them is); open the HTTP API."""
        self._watching = True
        await self.pool.start()
        await self.server.set_ready(self.pool.any_healthy())
        if self.http is not None:
            await self.http.start()

    async def release(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.pool.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def build(settings: GatewaySettings) -> GatewayApp:
    """The gateway, not yet listening (build it inside the event loop that will run it)."""
    return GatewayApp(settings)
