"""Where an upload's declared files are written while they arrive (the splitter is the client's own,
`openlora.files`, so uploads and downloads check bytes one way)."""

from __future__ import annotations

import re
from pathlib import Path

from openlora.files import DeclaredFile, FileSplitter

from services.adapter_store.bundle import check_names
from services.common.errors import InvalidArgument

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
