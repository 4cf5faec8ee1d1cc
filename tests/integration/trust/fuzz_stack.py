"""The servers the RPC fuzzer calls: a real store, attribution, worker (tiny model) and gateway wired
as in production, in one event loop on a thread of their own, so a synchronous hypothesis test can
send them one request at a time and read the status it got.

Every address a fetch could reach stays on this machine: web and Hub imports go to a closed loopback
port, and `https://` imports only to `localhost`, which the store's private-address check refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc

from services.adapter_store.app import build as build_store
from services.adapter_store.settings import StoreSettings
from services.attribution.app import build as build_attribution
from services.common.grpc_client import open_channel
from services.common.trust.roles import AUTHORIZATION, GATEWAY
from services.gateway.app import GatewayApp
from tests.e2e.cluster_kit import BackgroundLoop
from tests.integration.attribution.wire import attribution_settings
from tests.integration.gateway.kit import ACME_KEY, gateway_settings
from tests.integration.inference.cache_kit import small_adapter
from tests.integration.worker.kit import WorkerUnderTest, worker_settings
from tests.kit.service_auth import TableCaller, identity

BASE = "tiny-llama"
GOOD_ADAPTER = "acme/good"  # uploaded at start: fuzzed requests that name it reach the engine
PUBLIC_METHODS = (
    "/openlora.v1.Inference/Generate",
    "/openlora.v1.Inference/ListModels",
    *(m for m in AUTHORIZATION["store"]),  # the gateway's tenant-facing store API
)
# Server streams are read up to this many messages, then cancelled (a client hanging up).
MAX_READ = 32
# WatchRewards never ends by itself.
ENDLESS = {"/openlora.v1.Attribution/WatchRewards"}
ENDLESS_TIMEOUT_S = 0.3
_SHM = Path("/dev/shm")


@dataclass(frozen=True)
class Target:
    component: str  # "gateway", "worker", "store", "attribution"
    method: str  # full name, e.g. "/openlora.v1.Inference/Generate"

    @property
    def id(self) -> str:
        return f"{self.component}:{self.method.rsplit('/', 1)[1]}"


def targets() -> list[Target]:
    found = [Target("gateway", m) for m in PUBLIC_METHODS]
    for component, methods in AUTHORIZATION.items():
        found.extend(Target(component, m) for m in methods)
    return found


def method_descriptor(full_name: str) -> Any:
    service, _, name = full_name.strip("/").rpartition("/")
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: int
    cancelled_by_us: bool = False


class ErrorLog(logging.Handler):
    """Records of ERROR and above that carry a traceback: an exception no handler expected."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None:
            self.records.append(f"{record.name}: {record.getMessage()} ({record.exc_info[1]!r})")


@dataclass
class FuzzStack:
    root: Path
    model_dir: Path
    ports: dict[str, int]
    loop: BackgroundLoop
    apps: list[Any]
    errors: ErrorLog
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    _sync_channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def call(self, target: Target, requests: Sequence[Message], timeout_s: float = 20.0) -> Outcome:
        if method_descriptor(target.method).client_streaming:
            return self._call_streaming(target, requests, timeout_s)
        return self.loop.run(self._call(target, requests, timeout_s), timeout=timeout_s + 30)

    def _call_streaming(self, target: Target, requests: Sequence[Message], timeout_s: float) -> Outcome:
        """Client streams go through grpc's synchronous API: its asyncio client reports a server that
        ends the call before the client has sent everything as INTERNAL "Internal error from Core"
        whenever a later write fails, hiding the server's own status (grpc/grpc#36066)."""
        channel = self._sync_channels.get(target.component)
        if channel is None:
            channel = self._sync_channels[target.component] = grpc.insecure_channel(
                f"127.0.0.1:{self.ports[target.component]}"
            )
        method = method_descriptor(target.method)
        serialize: dict[str, Any] = {"request_serializer": lambda m: m.SerializeToString()}
        options: dict[str, Any] = {"timeout": timeout_s, "metadata": self.metadata(target)}
        read = 0
        try:
            if method.server_streaming:
                call: Any = channel.stream_stream(target.method, **serialize)(iter(list(requests)), **options)
                for _ in call:
                    read += 1
                    if read >= MAX_READ:
                        return Outcome(grpc.StatusCode.CANCELLED, "", read, cancelled_by_us=call.cancel())
                return Outcome(call.code(), call.details() or "", read)
            _, call = channel.stream_unary(target.method, **serialize).with_call(
                iter(list(requests)), **options
            )
            return Outcome(call.code(), call.details() or "", 1)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", read)

    def metadata(self, target: Target) -> tuple[tuple[str, str], ...]:
        if target.component == "gateway":
            return (("authorization", f"Bearer {ACME_KEY}"),)
        if target.component == "worker":  # as the gateway: its requests name their tenant
            return (identity(GATEWAY).metadata("worker"),)
        return (TableCaller().metadata(target.component, target.method),)

    async def _call(self, target: Target, requests: Sequence[Message], timeout_s: float) -> Outcome:
        channel = self._channels.get(target.component)
        if channel is None:
            channel = self._channels[target.component] = grpc.aio.insecure_channel(
                f"127.0.0.1:{self.ports[target.component]}"
            )
        method = method_descriptor(target.method)
        endless = target.method in ENDLESS
        options: dict[str, Any] = {
            "timeout": ENDLESS_TIMEOUT_S if endless else timeout_s,
            "metadata": self.metadata(target),
        }
        serialize = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": None}
        if method.server_streaming:
            call: Any = channel.unary_stream(target.method, **serialize)(requests[0], **options)
        else:
            call = channel.unary_unary(target.method, **serialize)(requests[0], **options)
        read, ours = 0, False
        with contextlib.suppress(grpc.aio.AioRpcError):
            if method.server_streaming:
                async for _ in call:
                    read += 1
                    if read >= MAX_READ and not endless:
                        ours = call.cancel()
                        break
            else:
                await call
                read = 1
        code = await call.code()
        return Outcome(code, await call.details() or "", read, ours)

    def close_channels(self) -> None:
        for sync_channel in self._sync_channels.values():
            sync_channel.close()

        async def close() -> None:
            for channel in self._channels.values():
                await channel.close()

        self.loop.run(close())

    def restore_good_adapter(self) -> None:
        """Upload the adapter the fuzzer names again, if a fuzzed Delete (of its tenant's own) took it."""
        if GOOD_ADAPTER not in self.stored_adapters():
            self.loop.run(_upload_good_adapter(f"127.0.0.1:{self.ports['store']}", self.root, self.model_dir))

    def stored_adapters(self) -> set[str]:
        async def listing() -> set[str]:
            async with open_channel(f"127.0.0.1:{self.ports['store']}") as channel:
                stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
                metadata = (TableCaller().metadata("store", "/openlora.v1.AdapterStore/List"),)
                found: set[str] = set()
                token = ""
                while True:
                    page = await stub.List(
                        store_pb.ListAdaptersRequest(page_token=token, page_size=1000), metadata=metadata
                    )
                    found.update(a.id for a in page.adapters)
                    if not page.next_page_token:
                        return found
                    token = page.next_page_token

        return self.loop.run(listing())

    def serving(self) -> dict[str, bool]:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async def check() -> dict[str, bool]:
            result = {}
            for name, port in self.ports.items():
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                    result[name] = reply.status == health_pb2.HealthCheckResponse.SERVING
            return result

        return self.loop.run(check())


@contextlib.contextmanager
def fuzz_stack(root: Path, model_dir: Path) -> Iterator[FuzzStack]:
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_CACHE")}
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    os.environ["HF_HUB_CACHE"] = str(root / "hf-cache")
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    loop = BackgroundLoop()
    apps: list[Any] = []
    # The ledger in memory where the machine has it: every accepted usage batch is an fsync, and the
    # slow run's thousands of them test the checks, not the disk (durability has tests of its own).
    ledger_dir = Path(tempfile.mkdtemp(prefix="openlora-fuzz-", dir=_SHM if _SHM.is_dir() else root))
    try:
        ports = loop.run(_start(root, model_dir, apps, ledger_dir / "ledger.sqlite3"))
        stack = FuzzStack(root, model_dir, ports, loop, apps, errors)
        try:
            yield stack
        finally:
            stack.close_channels()
    finally:
        loop.run(_stop(apps))
        loop.close()
        shutil.rmtree(ledger_dir, ignore_errors=True)
        logging.getLogger().removeHandler(errors)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def _start(root: Path, model_dir: Path, apps: list[Any], ledger: Path) -> dict[str, int]:
    (root / "import-root").mkdir(parents=True)
    store = build_store(
        StoreSettings(
            port=0,
            backend="local",
            local_dir=root / "store",
            log_level="ERROR",
            import_schemes=["hf", "s3", "https", "http", "file"],
            import_allowed_hosts=["localhost"],
            import_file_roots=[root / "import-root"],
            import_timeout_s=5.0,
        )
    )
    ports = {"store": await store.start()}
    apps.append(store)
    store_address = f"127.0.0.1:{ports['store']}"
    async with open_channel(store_address) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        operator = (TableCaller().metadata("store", "/openlora.v1.AdapterStore/RegisterBaseModel"),)
        await stub.RegisterBaseModel(
            store_pb.RegisterBaseModelRequest(name=BASE, config_json=(model_dir / "config.json").read_text()),
            metadata=operator,
        )
    await _upload_good_adapter(store_address, root, model_dir)
    attribution = build_attribution(
        attribution_settings(f"sqlite:///{ledger}", log_level="ERROR", store_address=store_address)
    )
    ports["attribution"] = await attribution.start()
    apps.append(attribution)
    worker = await WorkerUnderTest.start(
        worker_settings(
            root / "worker",
            model_dir,
            store_address=store_address,
            attribution_address=f"127.0.0.1:{ports['attribution']}",
            log_level="ERROR",
        )
    )
    ports["worker"] = worker.port
    apps.append(worker)
    gateway = GatewayApp(
        gateway_settings(
            root,
            [f"127.0.0.1:{worker.port}"],
            store_address=store_address,
            log_level="ERROR",
        )
    )
    ports["gateway"] = await gateway.start()
    apps.append(gateway)
    for _ in range(300):  # the gateway's first health round with the worker
        if gateway.pool.healthy_loads():
            break
        await asyncio.sleep(0.1)
    return ports


async def _upload_good_adapter(store_address: str, root: Path, model_dir: Path) -> None:
    folder = root / "good-adapter"
    if not folder.exists():
        small_adapter(model_dir, folder, seed=1)
    async with open_channel(store_address) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        header = store_pb.UploadHeader(id=GOOD_ADAPTER, owner="acme", base_model=BASE)
        uploader = (TableCaller().metadata("store", "/openlora.v1.AdapterStore/Upload"),)
        await upload(stub, header, adapter_files(folder), metadata=uploader)


async def _stop(apps: list[Any]) -> None:
    for app in reversed(apps):
        with contextlib.suppress(Exception):
            await (app.close() if hasattr(app, "close") else app.stop())
