"""Copy a byte stream to a file without exceeding the import size limit."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from services.common.errors import InvalidArgument


def write_limited(chunks: Iterable[bytes], target: Path, max_bytes: int, what: str) -> int:
    written = 0
    with open(target, "wb") as out:
        for chunk in chunks:
            written += len(chunk)
            if written > max_bytes:
                raise InvalidArgument("source_uri", f"{what} exceeds the {max_bytes}-byte import limit")
            out.write(chunk)
    return written
