"""The AdapterStore gRPC servicer: protobuf in, domain call (in a worker thread), protobuf out."""

from __future__ import annotations

import asyncio
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from openlora.files import DeclaredFile, FileMismatch, FileSplitter
from openlora.transfer import UPLOAD_ACCEPTED
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc

from services.adapter_store.convert import (
    base_model_to_proto,
    info_to_proto,
    provenance_to_dict,
    visibility_name,
)
from services.adapter_store.service import AdapterMeta, AdapterStoreService
from services.adapter_store.staging import stage_upload
from services.common.errors import InvalidArgument, ResourceExhausted


def _meta(header: Any) -> AdapterMeta:
    return AdapterMeta(
        id=header.id,
        owner=header.owner,
        visibility=visibility_name(header.visibility),
        provenance=provenance_to_dict(header.provenance),
        base_model=header.base_model,
    )


INGEST_RETRY_S = 5.0


class AdapterStoreServicer(adapter_store_pb2_grpc.AdapterStoreServicer):
    def __init__(self, service: AdapterStoreService) -> None:
        self.service = service
        limit = service.settings.max_concurrent_ingests
        self.ingests = _IngestSlots(limit, service.settings.max_waiting_ingests)
        # Uploads' unpacking and validation are CPU- and I/O-heavy: threads of their own, so that
        # the default executor's few threads stay free for Get, List and Download.
        self.ingest_pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="ingest")

    async def _ingest_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self.ingest_pool, functools.partial(fn, *args)
        )

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadChunk], context: Any) -> pb.AdapterInfo:
        workdir = Path(tempfile.mkdtemp(prefix="openlora-upload-"))
        stager: FileSplitter | None = None
        slot: _IngestSlot | None = None
        try:
            async for chunk in request_iterator:
                kind = chunk.WhichOneof("payload")
                if stager is None:
                    if kind != "header":
                        raise InvalidArgument(
                            "header", "the first message of an upload must carry the header"
                        )
                    header = chunk.header
                    declared = [DeclaredFile(f.name, f.size, f.sha256) for f in header.files]
                    stager = stage_upload(declared, workdir, self.service.settings.max_adapter_bytes)
                    slot = await self.ingests.take()  # its turn before its bytes are accepted
                    await context.send_initial_metadata((UPLOAD_ACCEPTED,))  # now the bytes may come
                elif kind == "data":
                    stager.write(chunk.data)
                else:
                    raise InvalidArgument("header", "sent more than once")
            if stager is None:
                raise InvalidArgument("header", "the upload stream was empty")
            staged = stager.finish()
            manifest = await self._ingest_thread(self.service.ingest, _meta(header), staged, workdir)
            return info_to_proto(manifest)
        except FileMismatch as exc:
            raise InvalidArgument(exc.field, exc.message) from None
        finally:
            if slot is not None:
                slot.release()
            if stager is not None:
                stager.abort()
            shutil.rmtree(workdir, ignore_errors=True)

    async def Import(self, request: pb.ImportRequest, context: Any) -> pb.AdapterInfo:
        meta = _meta(request)
        slot = await self.ingests.take()
        try:
            manifest = await self._ingest_thread(self.service.import_adapter, request.source_uri, meta)
        finally:
            slot.release()
        return info_to_proto(manifest)

    async def Get(self, request: pb.GetAdapterRequest, context: Any) -> pb.AdapterInfo:
        manifest = await asyncio.to_thread(self.service.get, request.adapter.id, request.adapter.version)
        return info_to_proto(manifest)

    async def List(self, request: pb.ListAdaptersRequest, context: Any) -> pb.ListAdaptersResponse:
        page, token = await asyncio.to_thread(
            lambda: self.service.list_adapters(
                base_model=request.base_model,
                owner=request.owner,
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return pb.ListAdaptersResponse(adapters=[info_to_proto(m) for m in page], next_page_token=token)

    async def Delete(self, request: pb.DeleteAdapterRequest, context: Any) -> pb.DeleteAdapterResponse:
        deleted = await asyncio.to_thread(self.service.delete, request.adapter.id, request.adapter.version)
        return pb.DeleteAdapterResponse(deleted_versions=deleted)

    async def Download(self, request: pb.DownloadRequest, context: Any) -> AsyncIterator[pb.DownloadChunk]:
        plan = await asyncio.to_thread(self.service.download, request.adapter.id, request.adapter.version)
        yield pb.DownloadChunk(
            header=pb.DownloadHeader(
                info=info_to_proto(plan.manifest),
                files=[pb.FileEntry(name=n, size=s, sha256=h) for n, s, h in plan.files],
            )
        )
        # Pull one chunk at a time off the event loop: only one chunk is ever held in memory.
        chunks: Iterator[bytes] = await asyncio.to_thread(plan.chunks)
        done = object()
        while (block := await asyncio.to_thread(next, chunks, done)) is not done:
            yield pb.DownloadChunk(data=block)  # type: ignore[arg-type]

    async def RegisterBaseModel(self, request: pb.RegisterBaseModelRequest, context: Any) -> pb.BaseModel:
        spec = await asyncio.to_thread(self.service.register_base_model, request.name, request.config_json)
        return base_model_to_proto(spec)

    async def ListBaseModels(
        self, request: pb.ListBaseModelsRequest, context: Any
    ) -> pb.ListBaseModelsResponse:
        specs = await asyncio.to_thread(self.service.base_models)
        return pb.ListBaseModelsResponse(base_models=[base_model_to_proto(s) for s in specs])


class _IngestSlot:
    __slots__ = ("_released", "_semaphore")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._semaphore.release()


class _IngestSlots:
    """At most `limit` uploads and imports run; up to `max_waiting` more wait for a turn (holding
    only their header: the store accepts their bytes once it is theirs); past that, refused."""

    def __init__(self, limit: int, max_waiting: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self.max_waiting = max_waiting
        self.waiting = 0

    async def take(self) -> _IngestSlot:
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"this store has {self.waiting} uploads or imports waiting already; retry shortly",
                retry_after_s=INGEST_RETRY_S,
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        return _IngestSlot(self._semaphore)
