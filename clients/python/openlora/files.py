"""Splits a stream of raw bytes into the files its header declared, checking sizes and sha256 as they arrive.

Uploads (the store's side) and downloads (the client's side) both send a header listing files, then the
files' bytes back to back; `FileSplitter` writes them out without ever holding more than one chunk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class DeclaredFile:
    name: str
    size: int
    sha256: str


class FileMismatch(ValueError):
    """The bytes disagree with the declaration; `field` names the part of the header (or `data`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while block := src.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def declare(paths: list[Path]) -> list[DeclaredFile]:
    return [DeclaredFile(path.name, path.stat().st_size, sha256_of(path)) for path in paths]


def adapter_files(source: Path) -> list[Path]:
    """The files to upload for a PEFT folder (its two files, and its own chat template when it has
    one: `chat_template.jinja`, else a `tokenizer_config.json`) or an archive (itself)."""
    if source.is_file():
        return [source]
    files = [source / "adapter_config.json", source / "adapter_model.safetensors"]
    for template in ("chat_template.jinja", "tokenizer_config.json"):
        if (source / template).is_file():
            return [*files, source / template]
    return files


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
            raise FileMismatch(
                f"header.files[{self._index}].sha256", f"does not match the bytes of {current.name}"
            )
        self._next_file()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._out is None:
                raise FileMismatch("data", "more bytes than the header declared")
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
            raise FileMismatch("data", f"stream ended before all of {self.files[self._index].name} arrived")
        return {f.name: p for f, p in zip(self.files, self.paths, strict=True)}

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
