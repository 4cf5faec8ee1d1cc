"""A durable queue of usage batches on local disk, dropped only once attribution acks them.

Each batch is one frame (see `frames`) appended to a segment file `seg-<first sequence>.v2` and
fsynced. Only an index (sequence -> segment, offset, length, crc) stays in memory, with the batches
this process appended and nobody acked yet: the sender takes those from memory, and reads from disk
only a backlog older than that (from an earlier run, or a long outage). The next sequence number is
kept in `state.json` (fsynced), so numbering survives a spool emptied by acks.

An ack costs no I/O of its own while the segment being written still has room: a worker flushes
about once a second, and a new segment, a state file and an unlink per flush cost several times the
append itself. A segment file goes once every batch in it is acked and nothing more will be written
to it (it is full, it is an earlier run's, or the spool is closed). The highest acked sequence is
noted in `acked.json` with the next append, without an fsync of its own: replay skips what it names,
and a note lost in a crash only means batches sent again, which attribution ignores by their keys.

Replay at start-up keeps every intact frame, once (of two intact copies of one sequence, left by a
failed append whose retry succeeded, the later one: the retry carries the same records and more).
Damaged bytes (a torn tail, a flipped bit) are skipped, copied aside to `damaged-<segment>-<offset>.bin`,
logged and counted in `damaged_frames`; the segment itself is left as it is, since it is never
appended to again. A sequence known to be lost (its header survived, or it falls between the first
sequence of the oldest segment and the highest one known) is replayed as an EMPTY batch so that
attribution's contiguous ack can pass it. Its worker id is that of the nearest intact batch before
it (after it, if none is before); with no intact batch at all, it is the worker id of the next
`append`, and `pending_after` stops in front of such a batch until then.

Still possible: a damaged frame at the very end of the spool whose header is gone too (a torn or
bit-flipped last header) is not known to have existed, so its sequence is handed out again. Attribution
inserts records idempotently on their own keys, so that reuse loses nothing it would otherwise have.
Legacy `seg-*.log` segments (`[length u32][crc32 u32][body]`) are read up to their first bad frame.
"""

from __future__ import annotations

import bisect
import json
import logging
import mmap
import os
import re
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from openlora.v1 import attribution_pb2

from services.inference.usage import frames

log = logging.getLogger("openlora.usage")
_STATE = "state.json"
_ACKED = "acked.json"
# Batches kept in memory for the sender, newest first to go: a long outage leaves the rest on disk.
RECENT_BATCHES = 256
_SEGMENT = re.compile(r"seg-(\d+)\.(v2|log)")
_COPY_CHUNK = 1 << 20


class SpoolFull(OSError):
    """The spool's disk (or byte budget) is full: batches stay in memory until it drains."""


@dataclass
class _Segment:
    path: Path
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where a batch's body lies on disk; `path` None for a lost batch, replayed empty."""

    path: Path | None
    offset: int = 0
    length: int = 0
    crc: int = 0
    worker_id: str | None = None  # a lost batch's, when replay could tell it


class UsageSpool:
    def __init__(self, directory: Path, *, segment_batches: int = 512, max_bytes: int = 1 << 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_batches = segment_batches
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: dict[int, _Entry] = {}
        self._order: list[int] = []  # the index's sequences, ascending
        self._segments: list[_Segment] = []
        self._open: tuple[Path, int, int] | None = None  # path, first sequence, batches written
        self._acked = 0
        self._acked_noted = 0  # the highest ack written to acked.json
        self._recent: dict[int, attribution_pb2.UsageBatch] = {}  # appended here, unacked, in order
        self._bytes: dict[Path, int] = {}  # segment -> its size, kept as we write (no stat per append)
        self._damaged = 0
        self._worker_id: str | None = None  # of the newest batch: lost batches read without one get it
        self._next = self._load_state()
        self._acked = self._acked_noted = self._load_acked()
        self._replay()

    # --- recovery

    def _load_state(self) -> int:
        try:
            return int(json.loads((self.directory / _STATE).read_text())["next_sequence"])
        except (FileNotFoundError, ValueError, KeyError):
            return 1

    def _load_acked(self) -> int:
        try:
            return max(0, int(json.loads((self.directory / _ACKED).read_text())["acked_sequence"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0  # lost or torn: acked batches are sent again, and attribution ignores them

    def _note_acked(self) -> None:
        """Write the highest ack, without an fsync: a note lost in a crash only costs resends."""
        if self._acked <= self._acked_noted:
            return
        tmp = self.directory / f".{_ACKED}.tmp"
        try:
            tmp.write_text(json.dumps({"acked_sequence": self._acked}))
            os.replace(tmp, self.directory / _ACKED)
        except OSError as exc:
            log.warning("usage spool: could not note the acked sequence: %s", exc)
            return
        self._acked_noted = self._acked

    def _save_state(self) -> None:
        tmp = self.directory / f".{_STATE}.tmp"
        with open(tmp, "w") as out:
            json.dump({"next_sequence": self._next}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.directory / _STATE)

    def _replay(self) -> None:
        found = sorted(
            (int(m[1]), path.name, path)
            for path in self.directory.iterdir()
            if (m := _SEGMENT.fullmatch(path.name))
        )
        intact: dict[int, _Entry] = {}
        spans: list[tuple[Path, int, int]] = []  # segment, its first sequence, the highest known in it
        for first, _, path in found:
            size = path.stat().st_size
            if size == 0:
                path.unlink()
                continue
            top = first  # a non-empty segment got at least the start of its first frame
            for frame in self._scan(path, intact):
                top = max(top, frame)
            spans.append((path, first, top))
            self._bytes[path] = size
            self._next = max(self._next, top + 1)
        if not spans:
            return
        acked = self._acked = min(self._acked, self._next - 1)
        for sequence in [s for s in intact if s <= acked]:
            del intact[sequence]
        lo = max(acked + 1, min(spans[0][1], min(intact, default=spans[0][1])))
        self._fill_index(lo, intact)
        for i, (path, first, top) in enumerate(spans):
            end = spans[i + 1][1] - 1 if i + 1 < len(spans) else self._next - 1
            self._segments.append(_Segment(path, first, max(top, end)))
        self._drop_segments(self._acked)  # an earlier run's, acked: never written again
        lost = sum(1 for e in self._index.values() if e.path is None)
        log.info("usage spool: replaying %d unacked batch(es), %d of them lost", len(self._order), lost)

    def _scan(self, path: Path, intact: dict[int, _Entry]) -> list[int]:
        """Put the segment's intact frames into `intact`; return every sequence it shows."""
        scanner = frames.scan_legacy if path.suffix == ".log" else frames.scan
        seen = []
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for item in scanner(buf):
                if isinstance(item, frames.Frame):
                    intact[item.sequence] = _Entry(path, item.offset, item.length, item.crc)
                    seen.append(item.sequence)
                    continue
                self._set_aside(path, item.start, buf, item.start, item.end, item.sequence)
                if item.sequence is not None:
                    seen.append(item.sequence)
        return seen

    def _fill_index(self, lo: int, intact: dict[int, _Entry]) -> None:
        previous: _Entry | None = None
        gap: list[int] = []
        for sequence in range(lo, self._next):
            entry = intact.get(sequence)
            if entry is None:
                gap.append(sequence)
                continue
            if gap:
                self._add_lost(gap, self._worker_of(previous or entry))
                gap = []
            self._index[sequence] = entry
            self._order.append(sequence)
            previous = entry
        self._worker_id = self._worker_of(previous) if previous else None
        self._add_lost(gap, self._worker_id)

    def _add_lost(self, sequences: list[int], worker_id: str | None) -> None:
        for sequence in sequences:
            self._index[sequence] = _Entry(None, worker_id=worker_id)
            self._order.append(sequence)

    @staticmethod
    def _worker_of(entry: _Entry) -> str | None:
        body = _read_body(entry)
        if body is None or zlib.crc32(body) != entry.crc:
            return None
        try:
            return attribution_pb2.UsageBatch.FromString(body).worker_id or None
        except DecodeError:
            return None

    def _set_aside(
        self, segment: Path, offset: int, buf: frames.Buffer, start: int, end: int, sequence: int | None
    ) -> None:
        """Count and log damaged bytes `buf[start:end]` once, keeping a copy for a post-mortem."""
        self._damaged += 1
        target = self.directory / f"damaged-{segment.name}-{offset}.bin"
        kept = f"copied to {target.name}" if end > start else "nothing left to copy"
        try:
            if end > start:
                with open(target, "wb") as out:
                    for at in range(start, end, _COPY_CHUNK):  # a damaged tail can be most of a segment
                        out.write(buf[at : min(at + _COPY_CHUNK, end)])
        except OSError as exc:
            kept = f"not copied aside ({exc})"
        what = f"sequence {sequence}" if sequence is not None else "its header lost too"
        log.warning(
            "usage spool: %d damaged byte(s) at offset %d of %s (%s), %s",
            end - start,
            offset,
            segment.name,
            what,
            kept,
        )

    # --- writing and acking

    def append(self, worker_id: str, records: list[attribution_pb2.TokenUsage]) -> int:
        """Make one batch durable (fsync) and return its sequence number. Raises SpoolFull."""
        with self._lock:
            sequence = self._next
            batch = attribution_pb2.UsageBatch(sequence=sequence, worker_id=worker_id, records=records)
            body = batch.SerializeToString()
            frame = frames.encode(sequence, body)
            if self.backlog_bytes + len(frame) > self.max_bytes:
                raise SpoolFull(f"usage spool over its {self.max_bytes}-byte budget")
            if self._open is None or self._open[2] >= self.segment_batches:
                self._open = (self.directory / f"seg-{sequence:016d}.v2", sequence, 0)
            path, first, written = self._open
            offset = self._write(path, frame, new=written == 0)
            self._open = (path, first, written + 1)
            self._bytes[path] = offset + len(frame)
            if written == 0:
                self._segments.append(_Segment(path, first, sequence))
            else:
                self._segments[-1].last = sequence
            self._index[sequence] = _Entry(path, offset + frames.HEADER.size, len(body), zlib.crc32(body))
            self._order.append(sequence)
            self._recent[sequence] = batch
            if len(self._recent) > RECENT_BATCHES:
                del self._recent[next(iter(self._recent))]
            self._worker_id = worker_id
            self._next = sequence + 1
            self._note_acked()
            return sequence

    def _write(self, path: Path, frame: bytes, *, new: bool) -> int:
        """Append and fsync `frame`; return its offset. On failure, cut the segment back and raise."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolFull(f"usage spool write failed: {exc}") from exc
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                if new:
                    _fsync_directory(self.directory)
            except OSError as exc:
                # A retry of this batch must not follow a partial frame (replay would skip it, but the
                # bytes would count against the budget and be copied aside at every start).
                try:
                    os.ftruncate(fd, size)
                except OSError as cut:
                    log.warning("usage spool: could not cut %s back after a failed write: %s", path.name, cut)
                raise SpoolFull(f"usage spool write failed: {exc}") from exc
            return size
        finally:
            os.close(fd)

    def pending_after(self, sequence: int, limit: int = 64) -> list[attribution_pb2.UsageBatch]:
        """Up to `limit` unacked batches above `sequence`, oldest first, read and crc-checked from disk.

        Blocking file I/O: call it off the event loop. A lost batch comes back empty. Empty means
        nothing to send now: it also stops in front of a lost batch whose worker id is unknown until
        the first `append` tells it.
        """
        while True:
            with self._lock:
                after = max(sequence, self._acked)
                start = bisect.bisect_right(self._order, after)
                wanted = [(s, self._index[s]) for s in self._order[start : start + limit]]
            batches, all_acked_meanwhile = self._load(wanted)
            if batches or not all_acked_meanwhile:
                return batches
            sequence = after  # an ack took the segments we were reading: look past it

    def pending_in_memory(self, sequence: int, limit: int = 64) -> list[attribution_pb2.UsageBatch] | None:
        """What `pending_after` would return, when this process still holds all of it in memory (no
        I/O: call it on the event loop); None when some of it must be read from disk."""
        with self._lock:
            after = max(sequence, self._acked)
            start = bisect.bisect_right(self._order, after)
            wanted = self._order[start : start + limit]
            recent = self._recent
            if not all(s in recent for s in wanted):
                return None
            return [recent[s] for s in wanted]

    def pending(self) -> list[attribution_pb2.UsageBatch]:
        """Every unacked batch, read from disk in one go: for tools and tests, not the sender."""
        return self.pending_after(0, sys.maxsize)

    def _load(self, wanted: list[tuple[int, _Entry]]) -> tuple[list[attribution_pb2.UsageBatch], bool]:
        batches: list[attribution_pb2.UsageBatch] = []
        acked_meanwhile = False
        for sequence, entry in wanted:
            batch = None
            if entry.path is not None:
                body = _read_body(entry)
                if body is None and not self._is_pending(sequence):
                    acked_meanwhile = True  # its segment went with the ack
                    continue
                batch = _decode(body, entry)
                if batch is None:
                    self._lose(sequence, entry, body or b"")
            if batch is None:
                worker_id = entry.worker_id or self._worker_id
                if worker_id is None:
                    break
                batch = attribution_pb2.UsageBatch(sequence=sequence, worker_id=worker_id)
            batches.append(batch)
        return batches, acked_meanwhile and not batches

    def _is_pending(self, sequence: int) -> bool:
        with self._lock:
            return sequence in self._index

    def _lose(self, sequence: int, entry: _Entry, data: bytes) -> None:
        """A batch intact at replay or append is damaged on disk now: from here on it is a lost one."""
        assert entry.path is not None
        with self._lock:
            if self._index.get(sequence) is not entry:
                return  # acked, or another reader got here first
            self._index[sequence] = _Entry(None, worker_id=self._worker_id)
            self._set_aside(entry.path, entry.offset, data, 0, len(data), sequence)

    def ack(self, sequence: int) -> None:
        """Attribution persisted every batch up to `sequence`: drop them, and remove the segments
        that are done (blocking file I/O when there are: see `mark_acked`)."""
        if self.mark_acked(sequence):
            self.drop_acked_segments()

    def mark_acked(self, sequence: int) -> bool:
        """Drop the batches up to `sequence` from the backlog, in memory only (cheap, no I/O: fine on
        the event loop). True when segment files are now done: `drop_acked_segments` removes them."""
        with self._lock:
            if sequence <= self._acked:
                return False
            self._acked = sequence
            cut = bisect.bisect_right(self._order, sequence)
            for s in self._order[:cut]:
                del self._index[s]
                self._recent.pop(s, None)
            del self._order[:cut]
            return any(seg.last <= sequence and not self._is_open(seg) for seg in self._segments)

    def drop_acked_segments(self) -> None:
        """Remove the files of acked segments that will not be written again (blocking I/O)."""
        with self._lock:
            self._drop_segments(self._acked)

    def seal(self) -> None:
        """Start the next append in a new segment, so the open one goes once acked, as an earlier run's
        would (the batch recovered from a crashed run's journal belongs to that run)."""
        with self._lock:
            self._open = None

    def close(self) -> None:
        """Stop writing the open segment, so that it goes too once acked (a clean stop leaves only
        what attribution has not acked yet)."""
        with self._lock:
            self._open = None
            self._drop_segments(self._acked)
            self._note_acked()

    def _is_open(self, segment: _Segment) -> bool:
        """The segment the next append writes to (a full one is not: the next append starts another)."""
        return (
            self._open is not None and self._open[0] == segment.path and self._open[2] < self.segment_batches
        )

    def _drop_segments(self, acked: int) -> None:
        done = [seg for seg in self._segments if seg.last <= acked and not self._is_open(seg)]
        if not done:
            return
        self._save_state()  # numbering must survive the segments that held it
        for seg in done:
            seg.path.unlink(missing_ok=True)
            self._bytes.pop(seg.path, None)
            if self._open is not None and self._open[0] == seg.path:
                self._open = None
        self._segments = [seg for seg in self._segments if seg not in done]

    @property
    def backlog_batches(self) -> int:
        return len(self._order)

    @property
    def backlog_bytes(self) -> int:
        """Bytes of the spool's segments on disk (what `max_bytes` bounds): the unacked batches, and
        the acked ones of a segment still being written."""
        return sum(self._bytes.values())

    @property
    def damaged_frames(self) -> int:
        """Damaged stretches found since this spool was opened (each logged once, copied aside)."""
        return self._damaged


def _read_body(entry: _Entry) -> bytes | None:
    """The entry's body bytes (maybe short, if the file shrank), or None if its segment is gone."""
    assert entry.path is not None
    try:
        fd = os.open(entry.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.pread(fd, entry.length, entry.offset)
    finally:
        os.close(fd)


def _decode(body: bytes | None, entry: _Entry) -> attribution_pb2.UsageBatch | None:
    if body is None or len(body) != entry.length or zlib.crc32(body) != entry.crc:
        return None
    try:
        return attribution_pb2.UsageBatch.FromString(body)
    except DecodeError:
        return None


def _fsync_directory(directory: Path) -> None:
    """Make a new segment's name durable, not only its contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
