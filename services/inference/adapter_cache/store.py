"""The adapter store as the cache sees it: `Get` to resolve a version, `Download` into a folder."""

from __future__ import annotations

from pathlib import Path

import grpc
from openlora.transfer import DownloadError, download
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc, common_pb2

from services.inference.adapter_cache.errors import AdapterCorrupt, store_error
from services.inference.adapter_cache.key import AdapterKey


class StoreFetcher:
    def __init__(self, stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub, timeout_s: float) -> None:
        self.stub = stub
        self.timeout_s = timeout_s
        self.gets = 0
        self.downloads = 0
        self.imports = 0

    async def info(self, adapter_id: str, version: str = "") -> pb.AdapterInfo:
        """The store's description of a version (the latest when version is empty)."""
        self.gets += 1
        request = pb.GetAdapterRequest(adapter=common_pb2.AdapterRef(id=adapter_id, version=version))
        try:
            reply: pb.AdapterInfo = await self.stub.Get(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise store_error(exc, AdapterKey(adapter_id, version or "latest").name, self.timeout_s) from None
        return reply

    async def import_uri(self, source_uri: str) -> pb.AdapterInfo:
        """Have the store fetch, validate and store the adapter at `source_uri`; its new version."""
        self.imports += 1
        try:
            reply: pb.AdapterInfo = await self.stub.Import(
                pb.ImportRequest(source_uri=source_uri), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise store_error(exc, source_uri, self.timeout_s) from None
        return reply

    async def download(self, adapter_id: str, version: str, dest: Path) -> pb.AdapterInfo:
        """Stream the version's two files into `dest`, each checked against the sizes and sha256
        the store declared; a mismatch raises AdapterCorrupt."""
        self.downloads += 1
        what = AdapterKey(adapter_id, version).name
        request = pb.DownloadRequest(adapter=common_pb2.AdapterRef(id=adapter_id, version=version))
        try:
            info = await download(self.stub, request, dest, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise store_error(exc, what, self.timeout_s) from None
        except DownloadError as exc:
            raise AdapterCorrupt(f"adapter {what}: download refused: {exc}") from None
        if (info.id, info.version) != (adapter_id, version):
            raise AdapterCorrupt(f"adapter {what}: the store sent {AdapterKey(info.id, info.version).name}")
        return info
