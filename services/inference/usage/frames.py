"""The usage spool's on-disk frames, and a scanner that finds every intact one around damage.

A frame is `[magic u32][sequence u64][body length u32][body crc32 u32][header crc32 u32][body]`,
little-endian, the header crc covering the 20 bytes before it. The header is checked on its own so
that a damaged body still tells which sequence it held, and the magic lets a scanner find the next
frame after damage it cannot parse. Segments of the first format (`[length u32][crc32 u32][body]`, no
sequence outside the body, no way to resynchronise) are still read, up to their first bad frame.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from openlora.v1 import attribution_pb2

MAGIC = 0x5355_4C4F  # b"OLUS" on disk
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<IQII")  # what the header crc covers
HEADER = struct.Struct("<IQIII")
LEGACY_HEADER = struct.Struct("<II")

Buffer = bytes | mmap.mmap


@dataclass(frozen=True, slots=True)
class Frame:
    """An intact frame: its body is `length` bytes at `offset` and has crc32 `crc`."""

    sequence: int
    offset: int
    length: int
    crc: int


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes `start:end` hold no intact frame; `sequence` is that of the frame whose header survived."""

    start: int
    end: int
    sequence: int | None


def encode(sequence: int, body: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, sequence, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def _header_at(buf: Buffer, pos: int) -> tuple[int, int, int] | None:
    """(sequence, body length, body crc) of an intact header at `pos`, else None."""
    if pos + HEADER.size > len(buf):
        return None
    magic, sequence, length, crc, head_crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC or zlib.crc32(buf[pos : pos + _HEAD.size]) != head_crc:
        return None
    return sequence, length, crc


def _next_header(buf: Buffer, start: int, stop: int | None = None) -> int:
    """Offset of the next intact header in `start:stop`, or `stop` (the end of `buf`) if none."""
    stop = len(buf) if stop is None else stop
    while (found := buf.find(_MAGIC_BYTES, start, min(stop + len(_MAGIC_BYTES) - 1, len(buf)))) != -1:
        if _header_at(buf, found) is not None:
            return found
        start = found + 1
    return stop


def scan(buf: Buffer) -> Iterator[Frame | Damage]:
    """Every intact frame and every damaged stretch of a segment, in file order."""
    pos, size = 0, len(buf)
    while pos < size:
        header = _header_at(buf, pos)
        if header is None:
            end = _next_header(buf, pos + 1)
            yield Damage(pos, end, None)
            pos = end
            continue
        sequence, length, crc = header
        body = pos + HEADER.size
        if body + length <= size and zlib.crc32(buf[body : body + length]) == crc:
            yield Frame(sequence, body, length, crc)
            pos = body + length
            continue
        # The intact header's length is right, but the next frame may start inside it (a short write
        # followed by a rewrite), so look for one right after the header.
        end = min(body + length, size)
        end = _next_header(buf, body, end)
        yield Damage(pos, end, sequence)
        pos = end


def scan_legacy(buf: Buffer) -> Iterator[Frame | Damage]:
    """Frames of a first-format segment up to its first bad one; all after that is one Damage."""
    pos, size = 0, len(buf)
    while pos + LEGACY_HEADER.size <= size:
        length, crc = LEGACY_HEADER.unpack_from(buf, pos)
        start = pos + LEGACY_HEADER.size
        body = buf[start : start + length]
        if len(body) != length or zlib.crc32(body) != crc:
            break
        yield Frame(attribution_pb2.UsageBatch.FromString(body).sequence, start, length, crc)
        pos = start + length
    if pos < size:
        yield Damage(pos, size, None)
