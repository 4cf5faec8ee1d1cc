"""What each request has billed since its records last reached the spool, written before its chunks
leave the worker, so that a worker killed between two spool flushes loses no token a client received.

Billing counts tokens as chunks are handed to the transport, and the spool takes the counts once per
flush interval (one fsync). In between they lived in memory only: a SIGKILL, an OOM kill or a crash
lost up to a flush interval of tokens that clients had already read (found by killing a worker under
load: a stream that had delivered 19 tokens was billed nothing). Now, in the event-loop turn in which
a chunk is counted, one `write` appends every changed count here; the transport's writer task runs
in a later turn, so the count is written before the chunk can go out. There is no fsync: the kernel
keeps written bytes past the death of the process. A power cut can still lose the last flush
interval, as before.

At the next start, `recover` turns what the journal holds into one spool batch and deletes it. The
records keep the keys the flushes would have given them (`request_id`, `token_index`, `kind`), so
whatever the spool already had is ignored by attribution as a resend.

A journal file is a run of frames `[body length u32][body crc32 u32][body]`; a body is a run of
entries, each opening with a kind byte:
- BEGIN: slot u32, then a `TokenUsage` holding the request's labels (the rest of the body);
- SHAPE: slot, prompt tokens not yet spooled (0: none), its stamp, the first token of the range still
  growing and its stamp, the completion count, then the ranges taken but not yet spooled;
- COUNTS: (slot, completion count) pairs, the common entry: a chunk changes nothing else;
- END: slot: every record of the request is in the spool.
The file is begun anew (the live requests' state written to a fresh one) once it passes
`rotate_bytes` at a flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from openlora.v1 import attribution_pb2

log = logging.getLogger("openlora.usage")

_FRAME = struct.Struct("<II")
_BEGIN, _SHAPE, _COUNTS, _END = 1, 2, 3, 4
_SLOT = struct.Struct("<BI")
_BEGIN_HEAD = struct.Struct("<BII")
_SHAPE_HEAD = struct.Struct("<BIIQIQII")
_RANGE = struct.Struct("<IIQ")
_COUNT = struct.Struct("<II")
_FILE = re.compile(r"journal-(\d+)\.bin")

Range = tuple[int, int, int]  # first token, count, stamp in ns


class Journaled(Protocol):
    """What the journal reads of a request's usage (`records.RequestUsage`)."""

    journal_slot: int
    journal_counted: bool
    """Queued in this turn's COUNTS already."""
    request_id: str
    completion_tokens: int

    def labels(self) -> attribution_pb2.TokenUsage: ...

    def shape(self) -> tuple[int, int, int, int, list[Range]]:
        """(unspooled prompt tokens, their stamp, open range's first token, its stamp, unspooled ranges)."""
        ...

    def mark_spooled(self, record: attribution_pb2.TokenUsage) -> None: ...

    @property
    def finished(self) -> bool:
        """Closed, and every record of it in the spool."""
        ...


class UsageJournal:
    def __init__(self, directory: Path, *, rotate_bytes: int = 4 << 20) -> None:
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self._live: dict[str, Journaled] = {}  # by usage id
        self._next_slot = 1
        self._begun: list[Journaled] = []
        self._reshaped: list[Journaled] = []
        self._counted: list[Journaled] = []
        self._dirty: set[int] = set()  # id() of requests queued in one of the lists above
        self._ended: list[int] = []
        self._scheduled = False
        self._file = self._next_file()
        self._fd = os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._failing = False

    def _next_file(self) -> Path:
        numbers = [int(m.group(1)) for p in self.directory.iterdir() if (m := _FILE.fullmatch(p.name))]
        return self.directory / f"journal-{max(numbers, default=0) + 1}.bin"

    # --- the hot path: called from the event loop's thread

    def begin(self, usage: Journaled) -> None:
        usage.journal_slot = self._next_slot
        self._next_slot += 1
        self._live[usage.request_id] = usage
        self._begun.append(usage)
        self._schedule()

    def reshaped(self, usage: Journaled) -> None:
        """Its ranges changed (a prompt, a new range, a take): written in full at the next write."""
        self._reshaped.append(usage)
        self._schedule()

    def end(self, usage: Journaled) -> None:
        """Every record of it is in the spool (or it had none): forget it."""
        if self._live.pop(usage.request_id, None) is not None:
            self._ended.append(usage.journal_slot)
            self._schedule()

    def counted(self, usage: Journaled) -> None:
        """Its count grew: once per turn, whatever the chunks (the caller keeps a flag)."""
        self._counted.append(usage)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            # Before any task this turn wakes (the transport's writer among them): callbacks run in order.
            asyncio.get_running_loop().call_soon(self.write)

    def write(self) -> None:
        """Append what changed since the last write, in one frame."""
        self._scheduled = False
        parts: list[bytes] = []
        for usage in self._begun:
            label = usage.labels().SerializeToString()
            parts.append(_BEGIN_HEAD.pack(_BEGIN, usage.journal_slot, len(label)) + label)
        shaped = set()
        for usage in self._begun + self._reshaped:
            if id(usage) not in shaped:
                shaped.add(id(usage))
                parts.append(_shape_entry(usage))
        counts = [u for u in self._counted if id(u) not in shaped]
        if counts:
            parts.append(_SLOT.pack(_COUNTS, len(counts)))
            parts.extend(_COUNT.pack(u.journal_slot, u.completion_tokens) for u in counts)
        for usage in self._counted:
            usage.journal_counted = False
        parts.extend(_SLOT.pack(_END, slot) for slot in self._ended)
        self._begun, self._reshaped, self._counted, self._ended = [], [], [], []
        if parts:
            self._append(b"".join(parts))

    def _append(self, body: bytes) -> None:
        frame = _FRAME.pack(len(body), zlib.crc32(body)) + body
        try:
            os.write(self._fd, frame)
        except OSError as exc:  # a full disk: the spool raises its own alarm; billing goes on in memory
            if not self._failing:  # once per episode: every turn would flood the log
                log.warning("usage journal write failed (%s): a crash now would lose unflushed usage", exc)
            self._failing = True
            return
        if self._failing:
            log.warning("usage journal writes again")
            self._failing = False
        self._size += len(frame)

    # --- after a spool append (event loop's thread)

    def spooled(self, records: Iterable[attribution_pb2.TokenUsage]) -> None:
        """These records are durable in the spool: their requests no longer need them journaled."""
        touched: dict[str, Journaled] = {}
        for record in records:
            usage = self._live.get(record.request_id)
            if usage is not None:
                usage.mark_spooled(record)
                touched[record.request_id] = usage
        for usage in touched.values():
            if usage.finished:
                self.end(usage)
            else:
                self.reshaped(usage)
        if self._size > self.rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        """A fresh file holding the live requests' state, then the old one goes."""
        self.write()
        old_fd, old_file = self._fd, self._file
        self._file = self._next_file()
        self._fd = os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._begun = list(self._live.values())
        self.write()
        os.close(old_fd)
        with contextlib.suppress(FileNotFoundError):
            old_file.unlink()

    def close(self, *, everything_spooled: bool) -> None:
        """Stop journaling; the files go when the spool holds everything they could give back."""
        self.write()
        os.close(self._fd)
        if everything_spooled:
            for path in journal_files(self.directory):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _shape_entry(usage: Journaled) -> bytes:
    prompt, prompt_ts, open_first, open_ts, ranges = usage.shape()
    head = _SHAPE_HEAD.pack(
        _SHAPE,
        usage.journal_slot,
        prompt,
        prompt_ts,
        open_first,
        open_ts,
        usage.completion_tokens,
        len(ranges),
    )
    return head + b"".join(_RANGE.pack(*r) for r in ranges)


def journal_files(directory: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


class _Recovered:
    def __init__(self, labels: attribution_pb2.TokenUsage) -> None:
        self.labels = labels
        self.prompt = self.prompt_ts = self.open_first = self.open_ts = self.completion = 0
        self.ranges: list[Range] = []


def recover(directory: Path) -> list[attribution_pb2.TokenUsage]:
    """The records the journal files in `directory` hold that may be missing from the spool (some may
    be there already: attribution ignores those as resends). A damaged frame ends its file's reading."""
    requests: dict[int, _Recovered] = {}
    for path in journal_files(directory):
        data = path.read_bytes()
        pos = 0
        while pos + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, pos)
            body = data[pos + _FRAME.size : pos + _FRAME.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                log.warning("usage journal %s: damaged from byte %d on; read up to there", path.name, pos)
                break
            _apply(body, requests)
            pos += _FRAME.size + length
    records = []
    for request in requests.values():
        records.extend(_records_of(request))
    return records


def _apply(body: bytes, requests: dict[int, _Recovered]) -> None:
    pos = 0
    while pos < len(body):
        kind = body[pos]
        if kind == _BEGIN:
            _, slot, length = _BEGIN_HEAD.unpack_from(body, pos)
            pos += _BEGIN_HEAD.size
            requests[slot] = _Recovered(attribution_pb2.TokenUsage.FromString(body[pos : pos + length]))
            pos += length
        elif kind == _SHAPE:
            _, slot, prompt, prompt_ts, open_first, open_ts, completion, n = _SHAPE_HEAD.unpack_from(
                body, pos
            )
            pos += _SHAPE_HEAD.size
            ranges = [_RANGE.unpack_from(body, pos + i * _RANGE.size) for i in range(n)]
            pos += n * _RANGE.size
            request = requests.get(slot)
            if request is not None:
                request.prompt, request.prompt_ts = prompt, prompt_ts
                request.open_first, request.open_ts = open_first, open_ts
                request.completion, request.ranges = completion, ranges
        elif kind == _COUNTS:
            _, n = _SLOT.unpack_from(body, pos)
            pos += _SLOT.size
            for i in range(n):
                slot, completion = _COUNT.unpack_from(body, pos + i * _COUNT.size)
                request = requests.get(slot)
                if request is not None:
                    request.completion = completion
            pos += n * _COUNT.size
        elif kind == _END:
            _, slot = _SLOT.unpack_from(body, pos)
            pos += _SLOT.size
            requests.pop(slot, None)
        else:
            raise ValueError(f"unknown usage journal entry kind {kind}")


def _records_of(request: _Recovered) -> list[attribution_pb2.TokenUsage]:
    records = []

    def record(kind: int, first: int, count: int, ts_ns: int) -> None:
        made = attribution_pb2.TokenUsage()
        made.CopyFrom(request.labels)
        made.kind, made.token_index, made.token_count = kind, first, count  # type: ignore[assignment]
        made.ts.FromNanoseconds(ts_ns)
        if kind != attribution_pb2.PROMPT:
            made.traceparent = ""
        records.append(made)

    if request.prompt:
        record(attribution_pb2.PROMPT, 0, request.prompt, request.prompt_ts)
    for first, count, ts_ns in request.ranges:
        record(attribution_pb2.COMPLETION, first, count, ts_ns)
    if request.completion > request.open_first:
        record(
            attribution_pb2.COMPLETION,
            request.open_first,
            request.completion - request.open_first,
            request.open_ts,
        )
    return records
