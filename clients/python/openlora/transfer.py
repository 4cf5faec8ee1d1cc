"""Adapter files over the `AdapterStore` API: streamed uploads from files, verified downloads to a folder.

Both directions stream in chunks, so memory stays bounded whatever the adapter's size; `progress` is
called with byte counts. The blocking client and asyncio callers (the `openlora adapters` CLI, workers on
a cache miss) share the same message builders and the same download checks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from openlora.files import CHUNK_BYTES, DeclaredFile, FileMismatch, FileSplitter, declare
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc

Progress = Callable[[int], None]
T = TypeVar("T")


class DownloadError(Exception):
    pass


def upload_messages(
    header: pb.UploadHeader, paths: list[Path], progress: Progress | None = None
) -> Iterator[pb.UploadChunk]:
    """The header (its `files` filled in from `paths`, sizes and sha256), then every file's bytes.

    The files are read for their digests here, before any call starts: a missing or unreadable file
    is the caller's OSError, not a failed call."""
    header.ClearField("files")
    header.files.extend(pb.FileEntry(name=f.name, size=f.size, sha256=f.sha256) for f in declare(paths))
    return _file_messages(header, paths, progress)


def _file_messages(
    header: pb.UploadHeader, paths: list[Path], progress: Progress | None
) -> Iterator[pb.UploadChunk]:
    yield pb.UploadChunk(header=header)
    for path in paths:
        with open(path, "rb") as src:
            while block := src.read(CHUNK_BYTES):
                yield pb.UploadChunk(data=block)
                if progress is not None:
                    progress(len(block))


async def in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """An iterator that reads files, advanced off the event loop."""
    while (item := await asyncio.to_thread(next, items, None)) is not None:
        yield item


UPLOAD_ACCEPTED = ("x-openlora-upload", "header-accepted")
"""Initial metadata a store (or the gateway in front of it) sends once an upload's header is accepted."""
ACCEPT_WAIT_S = 5.0
"""How long an upload waits for that before sending bytes anyway (a server that never says it)."""


async def stream_upload(
    call: grpc.aio.StreamUnaryCall[pb.UploadChunk, pb.AdapterInfo],
    messages: AsyncIterator[pb.UploadChunk],
) -> pb.AdapterInfo:
    """Send an upload on `call`: the header, then the bytes once the server has accepted the header.

    A server refuses a bad header (an id, a size, a base model) by ending the call at once. Bytes
    still being written then fail in grpc.aio, which reports INTERNAL in place of the server's
    status (grpc/grpc#36066); waiting for the acceptance first means a refused upload sends nothing
    more and the caller gets the real status and field.

    `call` must come from a channel whose interceptors return the call at once: one that awaits the
    response first (OpenTelemetry's) hides the initial metadata until the end and holds the writes."""
    try:
        header = await anext(messages)
        await call.write(header)
        try:
            answer = await asyncio.wait_for(asyncio.shield(call.initial_metadata()), ACCEPT_WAIT_S)
            accepted = UPLOAD_ACCEPTED in tuple(answer or ())  # none: the call ended (trailers only)
        except TimeoutError:
            accepted = not call.done()  # a server that does not say: send anyway
        if accepted:
            async for message in messages:
                await call.write(message)
            await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the call has ended (as a write began, or during one): awaiting it raises its status
    return await call


async def upload(
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub,
    header: pb.UploadHeader,
    paths: list[Path],
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> pb.AdapterInfo:
    """Upload files (header.files is filled in from them) and return the stored AdapterInfo."""
    messages = await asyncio.to_thread(upload_messages, header, paths, progress)
    call = stub.Upload(timeout=timeout, metadata=tuple(metadata))
    return await stream_upload(call, in_thread(messages))


class DownloadWriter:
    """Writes a download's messages into `dest`: files appear under their final names only once every
    one of them is complete and matches the size and sha256 the header declared."""

    def __init__(self, dest: Path, progress: Progress | None = None) -> None:
        self.dest = dest
        self.progress = progress
        self.info: pb.AdapterInfo | None = None
        self._splitter: FileSplitter | None = None
        self._parts: list[Path] = []

    def feed(self, chunk: pb.DownloadChunk) -> None:
        if self._splitter is None:
            self._start(chunk)
            return
        try:
            self._splitter.write(chunk.data)
        except FileMismatch as exc:
            raise DownloadError(str(exc)) from None
        if self.progress is not None:
            self.progress(len(chunk.data))

    def _start(self, first: pb.DownloadChunk) -> None:
        if first.WhichOneof("payload") != "header":
            raise DownloadError("the download stream did not start with a header")
        files = [DeclaredFile(f.name, f.size, f.sha256) for f in first.header.files]
        if any(Path(f.name).name != f.name or f.name.startswith(".") for f in files):
            raise DownloadError("the server named a file with a path in it")
        self.dest.mkdir(parents=True, exist_ok=True)
        self._parts = [self.dest / f".{f.name}.part" for f in files]
        self._splitter = FileSplitter(files, self._parts)
        self.info = first.header.info

    def finish(self) -> pb.AdapterInfo:
        if self._splitter is None or self.info is None:
            raise DownloadError("the download stream was empty")
        try:
            finished = self._splitter.finish()
        except FileMismatch as exc:
            raise DownloadError(str(exc)) from None
        for name, part in finished.items():
            os.replace(part, self.dest / name)
        return self.info

    def close(self) -> None:
        """Remove what a failed download left; completed files were renamed already."""
        if self._splitter is not None:
            self._splitter.abort()
        for part in self._parts:
            part.unlink(missing_ok=True)


async def download(
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub,
    ref: pb.GetAdapterRequest | pb.DownloadRequest,
    dest: Path,
    *,
    progress: Progress | None = None,
    timeout: float | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> pb.AdapterInfo:
    """Download an adapter's files into dest, checking each file's size and sha256; return its info."""
    writer = DownloadWriter(dest, progress)
    try:
        async for chunk in stub.Download(
            pb.DownloadRequest(adapter=ref.adapter), timeout=timeout, metadata=tuple(metadata)
        ):
            await asyncio.to_thread(writer.feed, chunk)
        return await asyncio.to_thread(writer.finish)
    finally:
        writer.close()
