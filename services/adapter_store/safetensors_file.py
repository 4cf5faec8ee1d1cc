"""Reading a safetensors file's header without trusting it, and writing the canonical form.

The header is parsed by hand so that a hostile file (huge header length, offsets past the end,
overlapping ranges) is refused before any tensor library touches it. The canonical form sorts the
tensors by name, packs them back to back and uses a fixed JSON header, so the same weights always
hash to the same digest whatever tool wrote the upload.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.common.errors import InvalidArgument

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
MAX_HEADER_BYTES = 16 * 1024 * 1024
FIELD = "adapter_model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int  # file offset of the data section
    tensors: dict[str, TensorEntry]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header: every refusal names what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as src:
        prefix = src.read(8)
        if len(prefix) < 8:
            raise InvalidArgument(FIELD, "too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument(
                FIELD, f"header length {header_len} exceeds the file or the {MAX_HEADER_BYTES}-byte cap"
            )
        raw = src.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise InvalidArgument(FIELD, "header is not valid JSON (or is nested too deep)") from None
    if not isinstance(header, dict):
        raise InvalidArgument(FIELD, "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument(FIELD, "__metadata__ must map strings to strings")
    data_size = size - 8 - header_len
    tensors = {name: _entry(name, spec, data_size) for name, spec in header.items()}
    covered = 0
    for entry in sorted(tensors.values(), key=lambda e: e.begin):
        if entry.begin != covered:
            raise InvalidArgument(
                FIELD, f"tensor {entry.name!r} overlaps another or leaves a gap in the data"
            )
        covered = entry.end
    if covered != data_size:
        raise InvalidArgument(FIELD, f"{data_size - covered} bytes of data belong to no tensor")
    return SafetensorsHeader(8 + header_len, tensors)


def _entry(name: str, spec: object, data_size: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise InvalidArgument(FIELD, f"tensor {name!r} has a malformed entry")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise InvalidArgument(FIELD, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(FIELD, f"tensor {name!r} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise InvalidArgument(FIELD, f"tensor {name!r} has data offsets {offsets!r} outside the file")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise InvalidArgument(FIELD, f"tensor {name!r}: byte length does not match shape {shape} and {dtype}")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_tensor_bytes(src: BinaryIO, header: SafetensorsHeader, entry: TensorEntry) -> bytes:
    src.seek(header.data_start + entry.begin)
    data = src.read(entry.nbytes)
    if len(data) != entry.nbytes:
        raise InvalidArgument(FIELD, f"tensor {entry.name!r} is truncated")
    return data


def write_canonical(
    source: Path, header: SafetensorsHeader, renames: Mapping[str, str], dest: Path, copy_bytes: int = 1 << 20
) -> str:
    """Write the tensors of `source` under their new names, sorted, to `dest`; return its sha256.

    Tensors are copied one range at a time, so memory stays bounded by `copy_bytes`.
    """
    order = sorted(renames.items(), key=lambda item: item[1])
    layout: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for old, new in order:
        entry = header.tensors[old]
        layout[new] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    head = json.dumps(layout, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8-byte alignment
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(dest, "wb") as out:
        for piece in (struct.pack("<Q", len(head)), head):
            out.write(piece)
            digest.update(piece)
        for old, _ in order:
            entry = header.tensors[old]
            src.seek(header.data_start + entry.begin)
            remaining = entry.nbytes
            while remaining:
                block = src.read(min(copy_bytes, remaining))
                if not block:
                    raise InvalidArgument(FIELD, f"tensor {old!r} is truncated")
                out.write(block)
                digest.update(block)
                remaining -= len(block)
    return digest.hexdigest()
