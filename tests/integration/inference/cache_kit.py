"""A real adapter store on loopback for the adapter cache's tests, counting the RPCs it serves.

The servicer is the store's own, subclassed only to count `Get` and `Download` calls (and, when asked,
to lie about a digest the way a buggy or hostile store would); everything else is the real service
on the local-directory backend.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc

from services.adapter_store.catalog import blob_key
from services.adapter_store.service import AdapterStoreService
from services.adapter_store.servicer import AdapterStoreServicer
from services.adapter_store.settings import StoreSettings
from services.cluster.synthetic_adapters import write_adapter
from services.common.contracts import SERVICE_NAMES
from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.inference.adapter_cache import AdapterCache, CacheConfig
from tests.kit.service_auth import trusted

BASE = "tiny-llama"


class CountingServicer(AdapterStoreServicer):
    """The store's servicer, counting calls; `flip_byte` corrupts the weights in flight *and* declares
    the corrupt bytes' own sha256, so only a client that checks the digest it expects catches it."""

    def __init__(self, service: AdapterStoreService) -> None:
        super().__init__(service)
        self.calls: Counter[str] = Counter()
        self.flip_byte = False

    async def Get(self, request: pb.GetAdapterRequest, context: Any) -> pb.AdapterInfo:
        self.calls["Get"] += 1
        return await super().Get(request, context)

    async def Import(self, request: pb.ImportRequest, context: Any) -> pb.AdapterInfo:
        self.calls["Import"] += 1
        return await super().Import(request, context)

    async def Download(self, request: pb.DownloadRequest, context: Any) -> AsyncIterator[pb.DownloadChunk]:
        self.calls["Download"] += 1
        chunks = [chunk async for chunk in super().Download(request, context)]
        if self.flip_byte:
            chunks = _flipped(chunks)
        for chunk in chunks:
            yield chunk


def _flipped(chunks: list[pb.DownloadChunk]) -> list[pb.DownloadChunk]:
    import hashlib

    data = bytearray(b"".join(c.data for c in chunks[1:]))
    header = chunks[0].header
    config_size = header.files[0].size
    data[-1] ^= 0x01  # the last byte belongs to the weights (the config comes first)
    header.files[1].sha256 = hashlib.sha256(bytes(data[config_size:])).hexdigest()
    return [chunks[0], pb.DownloadChunk(data=bytes(data))]


@dataclass
class Store:
    service: AdapterStoreService
    servicer: CountingServicer
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop()

    async def upload(self, folder: Path, adapter_id: str) -> pb.AdapterInfo:
        header = pb.UploadHeader(id=adapter_id, owner="acme", base_model=BASE)
        return await upload(self.stub, header, adapter_files(folder))

    def corrupt_blob(self, digest: str) -> None:
        """Flip one byte of the stored weights blob, as disk rot would."""
        path = Path(self.service.settings.local_dir) / blob_key(digest)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))


async def start_store(root: Path, base_dir: Path, **settings_overrides: Any) -> Store:
    settings = StoreSettings(
        **{"port": 0, "backend": "local", "local_dir": root, "max_rank": 64, **settings_overrides}
    )
    service = AdapterStoreService(settings)
    servicer = CountingServicer(service)
    binding = ServiceBinding(
        name=SERVICE_NAMES["adapter_store"],
        attach=lambda server: adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(servicer, server),
    )
    server = GrpcServer(settings, [binding], component="store")
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}", **trusted("store"))
    stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
    await stub.RegisterBaseModel(
        pb.RegisterBaseModelRequest(name=BASE, config_json=(base_dir / "config.json").read_text())
    )
    return Store(service, servicer, server, channel, stub)


def small_adapter(base_dir: Path, out_dir: Path, *, seed: int, rank: int = 4) -> Path:
    """A PEFT-format adapter on q_proj and v_proj of the tiny Llama, random weights from `seed`."""
    config = json.loads((base_dir / "config.json").read_text())
    return write_adapter(out_dir, config, rank=rank, targets=["q_proj", "v_proj"], seed=seed)


async def open_cache(store: Store, root: Path, **overrides: Any) -> AdapterCache:
    values: dict[str, Any] = {"host_bytes": 1 << 24, "disk_bytes": 1 << 26, "disk_dir": root} | overrides
    config = CacheConfig(**values)
    cache = AdapterCache(store.stub, config)
    await cache.start()
    return cache
