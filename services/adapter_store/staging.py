"""Splits a stream of raw bytes into the files its header declared, checking sizes and sha256 as they arrive.

Uploads (server side) and downloads (client side) both send a header listing files, then the files'
bytes back to back; `FileSplitter` writes them out without ever holding more than one chunk.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.adapter_store.bundle import check_names
from services.common.errors import InvalidArgument

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DeclaredFile:
    name: str
    size: int
    sha256: str


class FileSplitter:
    def __init__(self, files: list[DeclaredFile], paths: list[Path]) -> None:
        self.files = files
        self.paths = paths
        self._index = -1
        self._written = 0
        self._hash = hashlib.sha256()
        self._out: BinaryIO | None = None
        self._next_file()

    def _next_file(self) -> None:
        self._index += 1
        self._written = 0
        self._hash = hashlib.sha256()
        self._out = open(self.paths[self._index], "wb") if self._index < len(self.files) else None  # noqa: SIM115

    def _close_current(self) -> None:
        assert self._out is not None
        self._out.close()
        current = self.files[self._index]
        if self._hash.hexdigest() != current.sha256:
            raise InvalidArgument(
                f"header.files[{self._index}].sha256", f"does not match the bytes of {current.name}"
            )
        self._next_file()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._out is None:
                raise InvalidArgument("data", "more bytes than the header declared")
            take = min(len(view), self.files[self._index].size - self._written)
            self._out.write(view[:take])
            self._hash.update(view[:take])
            self._written += take
            view = view[take:]
            if self._written == self.files[self._index].size:
                self._close_current()

    def finish(self) -> dict[str, Path]:
        """Check that every declared byte arrived; return name -> path."""
        while self._out is not None and self.files[self._index].size == self._written == 0:
            self._close_current()  # trailing empty files
        if self._out is not None:
            raise InvalidArgument(
                "data", f"stream ended before all of {self.files[self._index].name} arrived"
            )
        return {f.name: p for f, p in zip(self.files, self.paths, strict=True)}

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def stage_upload(files: list[DeclaredFile], workdir: Path, max_bytes: int) -> FileSplitter:
    """A splitter for an upload's declared files, once the declaration itself is acceptable."""
    check_names([f.name for f in files])
    for i, f in enumerate(files):
        if not _SHA256.fullmatch(f.sha256):
            raise InvalidArgument(f"header.files[{i}].sha256", "must be 64 lower-case hex digits")
    total = sum(f.size for f in files)
    if total > max_bytes:
        raise InvalidArgument("header.files", f"{total} bytes exceed the {max_bytes}-byte upload limit")
    return FileSplitter(files, [workdir / f"upload-{i}-{Path(f.name).name}" for i, f in enumerate(files)])
