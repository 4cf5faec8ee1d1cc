"""A durable queue of usage batches on local disk, dropped only once attribution acks them.

Batches are appended to segment files as `[length u32][crc32 u32][UsageBatch bytes]` and fsynced, one
fsync per batch. A torn tail (the process died mid-write) fails its CRC and is cut off on open, so a
restarted worker replays exactly what it had made durable. A segment file is deleted once every batch
in it is acked. The next sequence number is kept in `state.json` too, so numbering survives a spool
that was emptied by acks.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from services.common.proto import attribution_pb2

log = logging.getLogger("openlora.usage")
_HEADER = struct.Struct("<II")
_STATE = "state.json"


class SpoolFull(OSError):
    """The spool's disk (or byte budget) is full: batches stay in memory until it drains."""


@dataclass(frozen=True)
class _Segment:
    path: Path
    first: int
    last: int


class UsageSpool:
    def __init__(self, directory: Path, *, segment_batches: int = 512, max_bytes: int = 1 << 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_batches = segment_batches
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._pending: dict[int, attribution_pb2.UsageBatch] = {}
        self._segments: list[_Segment] = []
        self._open: tuple[Path, int, int] | None = None  # path, first sequence, batches written
        self._acked = 0
        self._bytes: dict[Path, int] = {}  # segment -> its size, kept as we write (no stat per append)
        self._next = self._load_state()
        self._replay()

    # --- recovery

    def _load_state(self) -> int:
        try:
            return int(json.loads((self.directory / _STATE).read_text())["next_sequence"])
        except (FileNotFoundError, ValueError, KeyError):
            return 1

    def _save_state(self) -> None:
        tmp = self.directory / f".{_STATE}.tmp"
        with open(tmp, "w") as out:
            json.dump({"next_sequence": self._next}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.directory / _STATE)

    def _replay(self) -> None:
        for path in sorted(self.directory.glob("seg-*.log")):
            batches, good_bytes = self._read_segment(path)
            if good_bytes < path.stat().st_size:
                log.warning("usage spool: cutting a torn tail off %s", path.name)
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
            if not batches:
                path.unlink()
                continue
            for batch in batches:
                self._pending[batch.sequence] = batch
            self._segments.append(_Segment(path, batches[0].sequence, batches[-1].sequence))
            self._bytes[path] = good_bytes
            self._next = max(self._next, batches[-1].sequence + 1)
        if self._pending:
            log.info("usage spool: replaying %d unacked batch(es)", len(self._pending))

    @staticmethod
    def _read_segment(path: Path) -> tuple[list[attribution_pb2.UsageBatch], int]:
        data = path.read_bytes()
        batches, offset = [], 0
        while offset + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, offset)
            body = data[offset + _HEADER.size : offset + _HEADER.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                break
            batches.append(attribution_pb2.UsageBatch.FromString(body))
            offset += _HEADER.size + length
        return batches, offset

    # --- writing and acking

    def append(self, worker_id: str, records: list[attribution_pb2.TokenUsage]) -> int:
        """Make one batch durable (fsync) and return its sequence number. Raises SpoolFull."""
        with self._lock:
            sequence = self._next
            batch = attribution_pb2.UsageBatch(sequence=sequence, worker_id=worker_id, records=records)
            body = batch.SerializeToString()
            if self.backlog_bytes + len(body) > self.max_bytes:
                raise SpoolFull(f"usage spool over its {self.max_bytes}-byte budget")
            if self._open is None or self._open[2] >= self.segment_batches:
                self._open = (self.directory / f"seg-{sequence:016d}.log", sequence, 0)
            path, first, written = self._open
            try:
                with open(path, "ab") as out:
                    out.write(_HEADER.pack(len(body), zlib.crc32(body)) + body)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise SpoolFull(f"usage spool write failed: {exc}") from exc
            self._open = (path, first, written + 1)
            self._bytes[path] = self._bytes.get(path, 0) + _HEADER.size + len(body)
            if written == 0:
                self._segments.append(_Segment(path, first, sequence))
            else:
                self._segments[-1] = _Segment(path, first, sequence)
            self._pending[sequence] = batch
            self._next = sequence + 1
            return sequence

    def pending(self) -> list[attribution_pb2.UsageBatch]:
        """Unacked batches, oldest first (what to send after a reconnect)."""
        with self._lock:
            return [self._pending[s] for s in sorted(self._pending)]

    def ack(self, sequence: int) -> None:
        """Attribution persisted every batch up to `sequence`: drop them and their finished segments."""
        with self._lock:
            if sequence <= self._acked:
                return
            self._acked = sequence
            for s in [s for s in self._pending if s <= sequence]:
                del self._pending[s]
            done = [seg for seg in self._segments if seg.last <= sequence]
            if not done:
                return
            self._save_state()  # numbering must survive the segments that held it
            for seg in done:
                seg.path.unlink(missing_ok=True)
                self._bytes.pop(seg.path, None)
                if self._open is not None and self._open[0] == seg.path:
                    self._open = None
            self._segments = [seg for seg in self._segments if seg.last > sequence]

    @property
    def backlog_batches(self) -> int:
        return len(self._pending)

    @property
    def backlog_bytes(self) -> int:
        return sum(self._bytes.values())
