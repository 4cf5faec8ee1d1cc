"""Client helpers for the AdapterStore service: streaming upload from files, verified download to a folder.

Used by the `openlora adapters` CLI, by workers on a cache miss, and by tests. Both directions stream in
chunks, so memory stays bounded whatever the adapter's size; `progress` is called with byte counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc

from services.adapter_store.staging import DeclaredFile, FileSplitter
from services.common.errors import InvalidArgument
from services.common.proto import adapter_store_pb2 as pb
from services.common.proto import adapter_store_pb2_grpc

CHUNK_BYTES = 1 << 20
Progress = Callable[[int], None]


def describe_files(paths: list[Path]) -> list[pb.FileEntry]:
    entries = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as src:
            while block := src.read(CHUNK_BYTES):
                digest.update(block)
        entries.append(pb.FileEntry(name=path.name, size=path.stat().st_size, sha256=digest.hexdigest()))
    return entries


def adapter_files(source: Path) -> list[Path]:
    """The files to upload for a PEFT folder (its two files) or an archive (itself)."""
    if source.is_file():
        return [source]
    return [source / "adapter_config.json", source / "adapter_model.safetensors"]


async def upload(
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub,
    header: pb.UploadHeader,
    paths: list[Path],
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> pb.AdapterInfo:
    """Upload files (header.files is filled in from them) and return the stored AdapterInfo.

    `metadata` goes with the call: `(("authorization", "Bearer <API key>"),)` through the gateway."""
    header.ClearField("files")
    header.files.extend(await asyncio.to_thread(describe_files, paths))

    async def chunks() -> AsyncIterator[pb.UploadChunk]:
        yield pb.UploadChunk(header=header)
        for path in paths:
            src = await asyncio.to_thread(open, path, "rb")
            try:
                while block := await asyncio.to_thread(src.read, CHUNK_BYTES):
                    yield pb.UploadChunk(data=block)
                    if progress is not None:
                        progress(len(block))
            finally:
                src.close()

    return await stub.Upload(chunks(), timeout=timeout, metadata=tuple(metadata))


class DownloadError(Exception):
    pass


async def download(
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub,
    ref: pb.GetAdapterRequest | pb.DownloadRequest,
    dest: Path,
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> pb.AdapterInfo:
    """Download an adapter's files into dest, checking each file's size and sha256; return its info.

    Files appear under their final names only once complete and verified.
    """
    call = stub.Download(pb.DownloadRequest(adapter=ref.adapter), timeout=timeout)
    first = await call.read()
    if not isinstance(first, pb.DownloadChunk) or first.WhichOneof("payload") != "header":
        raise DownloadError("the download stream did not start with a header")
    files = [DeclaredFile(f.name, f.size, f.sha256) for f in first.header.files]
    if any(Path(f.name).name != f.name or f.name.startswith(".") for f in files):
        raise DownloadError("the server named a file with a path in it")
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    parts = [dest / f".{f.name}.part" for f in files]
    splitter = await asyncio.to_thread(FileSplitter, files, parts)
    try:
        while (chunk := await call.read()) is not grpc.aio.EOF:
            assert isinstance(chunk, pb.DownloadChunk)
            await asyncio.to_thread(splitter.write, chunk.data)
            if progress is not None:
                progress(len(chunk.data))
        for name, part in splitter.finish().items():
            os.replace(part, dest / name)
    except InvalidArgument as exc:
        raise DownloadError(exc.message) from None
    finally:
        splitter.abort()
        for part in parts:  # leftovers of a failed download; completed files were moved already
            part.unlink(missing_ok=True)
    return first.header.info
