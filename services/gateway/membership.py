"""The set of workers and their health: a static list or a DNS name, each worker watched.

Every worker has one channel and a `grpc.health.v1.Health/Watch` stream on the `Inference` service;
it takes traffic while the watch says SERVING and no request has just failed on it. A worker that
fails a request, or whose watch breaks, is taken out and probed again with a doubling delay until
it answers SERVING — that is how a restarted worker comes back into rotation. A `dns:///` name is
resolved again every `dns_refresh_s`; workers that disappear finish their streams, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openlora.v1 import inference_pb2, inference_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.common.contracts import SERVICE_NAMES
from services.common.grpc_client import ClientTLS, open_channel
from services.common.trust.credentials import CallerIdentity
from services.gateway.routing import WorkerLoad
from services.gateway.settings import GatewaySettings
from services.gateway.worker_addresses import DnsName, parse_workers
from services.gateway.worker_link import WorkerLink

log = logging.getLogger("openlora.gateway.workers")

SERVING = health_pb2.HealthCheckResponse.SERVING
INFERENCE = SERVICE_NAMES["inference"]
GENERATE_METHOD = f"/{INFERENCE}/Generate"


def upstream_channel(
    target: str,
    settings: GatewaySettings,
    tls: ClientTLS | None,
    tracer_provider: TracerProvider | None,
    *,
    identity: CallerIdentity | None,
    audience: str,
    client_streams: bool = True,
) -> grpc.aio.Channel:
    """A channel to a worker or the store (`audience`) that finds a restarted peer within
    `worker_retry_max_s`. With an `identity`, every call carries the gateway's service token."""
    return open_channel(
        target,
        settings,
        tls=tls,
        tracer_provider=tracer_provider,
        identity=identity,
        audience=audience,
        reconnect_s=(settings.worker_retry_s, settings.worker_retry_max_s),
        client_streams=client_streams,
    )


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every `ip:port` a name resolves to (`[ip]:port` for IPv6), sorted; OSError when it does not."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = set()
    for family, _, _, _, sockaddr in infos:
        ip, bound = str(sockaddr[0]), int(sockaddr[1])
        addresses.add(f"[{ip}]:{bound}" if family == socket.AF_INET6 else f"{ip}:{bound}")
    return sorted(addresses)


class WorkerEndpoint:
    """One worker: its channel, in-flight count and health."""

    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel,
        settings: GatewaySettings,
        on_change: Callable[[], None],
        *,
        relay_metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple,
    ) -> None:
        self.address = address
        self.channel = channel
        self.stub = inference_pb2_grpc.InferenceStub(channel)
        self.link = WorkerLink(channel, address, relay_metadata, max_message_bytes=settings.max_message_bytes)
        # Generate for a worker without the relay, its chunks left serialized for the client.
        self.generate_call: grpc.aio.UnaryStreamMultiCallable[Any, bytes] = channel.unary_stream(
            GENERATE_METHOD,
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=None,
        )
        self.settings = settings
        self.on_change = on_change
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.watch_serving = False
        self.suspended = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._probing = False

    @property
    def healthy(self) -> bool:
        return self.watch_serving and not self.suspended

    def start(self) -> None:
        self._spawn(self._watch())

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set(self, *, serving: bool | None = None, suspended: bool | None = None) -> None:
        before = self.healthy
        if serving is not None:
            if serving and not self.watch_serving:
                self.link.supported = True  # back after a restart: maybe a release with the relay
            self.watch_serving = serving
        if suspended is not None:
            self.suspended = suspended
        if self.healthy != before:
            log.info("worker %s %s", self.address, "in rotation" if self.healthy else "out of rotation")
            self.on_change()

    def report_failure(self) -> None:
        """A request failed on this worker as if it were down: stop routing here until a probe passes."""
        self._set(suspended=True)
        if not self._probing:
            self._probing = True
            self._spawn(self._probe())

    async def _probe(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        delay = self.settings.worker_retry_s
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=INFERENCE), timeout=delay)
                    if reply.status == SERVING:
                        self._set(suspended=False)
                        return
                except grpc.aio.AioRpcError:
                    pass  # still down
                delay = min(delay * 2, self.settings.worker_retry_max_s)
        finally:
            self._probing = False

    async def _watch(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        delay = self.settings.worker_retry_s
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=INFERENCE)):
                    serving = reply.status == SERVING
                    self._set(serving=serving)
                    if serving:
                        delay = self.settings.worker_retry_s
            except grpc.aio.AioRpcError as exc:
                log.debug("health watch of %s ended: %s", self.address, exc.code().name)
            except Exception:  # never let one surprise end the watch: the worker would be lost for good
                log.exception("health watch of %s failed", self.address)
            self._set(serving=False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.worker_retry_max_s)

    async def close(self, grace_s: float) -> None:
        """Stop watching; wait up to `grace_s` for this worker's streams to end, then close."""
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        await self.link.close()
        await self.channel.close()


class WorkerPool:
    """The workers the gateway routes to; `on_change` is called when the healthy set changes."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tls: ClientTLS | None = None,
        tracer_provider: TracerProvider | None = None,
        identity: CallerIdentity | None = None,
        on_change: Callable[[], None] = lambda: None,
        resolve: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.target = parse_workers(settings.workers)
        self.resolve = resolve or resolve_dns
        if tls is not None and tls.server_name is None and isinstance(self.target, DnsName):
            # Workers found by DNS are dialled by pod IP: their certificates carry the Service's name.
            tls = dataclasses.replace(tls, server_name=self.target.host)
        self.tls = tls
        self.tracer_provider = tracer_provider
        self.on_change = on_change
        self.endpoints: dict[str, WorkerEndpoint] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _relay_metadata(self) -> tuple[tuple[str, str], ...]:
        """The gateway's token for a worker's relay call (a fresh one per call)."""
        return (self.identity.metadata("worker"),) if self.identity is not None else ()

    async def start(self) -> None:
        if isinstance(self.target, DnsName):
            await self._refresh_dns()
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        else:
            self._update(self.target)

    def healthy_loads(self) -> list[WorkerLoad]:
        return [WorkerLoad(e.address, e.in_flight) for e in self.endpoints.values() if e.healthy]

    def any_healthy(self) -> bool:
        return any(e.healthy for e in self.endpoints.values())

    def get(self, address: str) -> WorkerEndpoint | None:
        return self.endpoints.get(address)

    def _update(self, addresses: list[str]) -> None:
        for address in addresses:
            if address not in self.endpoints:
                channel = upstream_channel(
                    address,
                    self.settings,
                    self.tls,
                    self.tracer_provider,
                    identity=self.identity,
                    audience="worker",
                    client_streams=False,  # the relay call carries its token itself
                )
                endpoint = WorkerEndpoint(
                    address, channel, self.settings, self.on_change, relay_metadata=self._relay_metadata
                )
                self.endpoints[address] = endpoint
                endpoint.start()
                log.info("worker %s added", address)
        for address in set(self.endpoints) - set(addresses):
            endpoint = self.endpoints.pop(address)
            log.info("worker %s removed", address, extra={"in_flight": endpoint.in_flight})
            task = asyncio.get_running_loop().create_task(endpoint.close(self.settings.grace_period_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            self.on_change()

    async def _refresh_dns(self) -> None:
        assert isinstance(self.target, DnsName)
        try:
            addresses = await self.resolve(self.target.host, self.target.port)
        except OSError as exc:
            log.warning(
                "cannot resolve %s; keeping %d worker(s): %s", self.target.host, len(self.endpoints), exc
            )
            return
        self._update(addresses)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.dns_refresh_s)
            await self._refresh_dns()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        endpoints, self.endpoints = list(self.endpoints.values()), {}
        await asyncio.gather(*(e.close(0) for e in endpoints), *self._closing, return_exceptions=True)
