"""`UsageSpool`: every fsynced batch replayed once around damage, no sequence reused, acked ones not
replayed, fresh batches sent from memory and a backlog from disk."""

from __future__ import annotations

import errno
import gc
import logging
import os
import struct
import types
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from openlora.v1 import attribution_pb2

from services.inference.usage import frames
from services.inference.usage.spool import RECENT_BATCHES, SpoolFull, UsageSpool

WORKER = "worker-a"


def records(tag: str, n: int = 3) -> list[attribution_pb2.TokenUsage]:
    return [
        attribution_pb2.TokenUsage(
            request_id=tag, token_index=i, kind=attribution_pb2.COMPLETION, worker_id=WORKER
        )
        for i in range(n)
    ]


def replayed(directory: Path) -> list[tuple[int, str, list[str]]]:
    """(sequence, worker id, request ids) of every batch a fresh spool on `directory` would send."""
    return [
        (b.sequence, b.worker_id, [r.request_id for r in b.records])
        for b in UsageSpool(directory).pending_after(0, 1000)
    ]


def only_segment(directory: Path) -> Path:
    (segment,) = directory.glob("seg-*.v2")
    return segment


def frame_spans(segment: Path) -> list[tuple[int, int]]:
    """(header offset, end) of each frame of an undamaged segment."""
    spans = []
    for item in frames.scan(segment.read_bytes()):
        assert isinstance(item, frames.Frame)
        spans.append((item.offset - frames.HEADER.size, item.offset + item.length))
    return spans


def three_batches(directory: Path) -> Path:
    spool = UsageSpool(directory)
    assert [spool.append(WORKER, records(tag)) for tag in ("a", "b", "c")] == [1, 2, 3]
    return only_segment(directory)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def damaged_copies(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("damaged-*.bin")}


# --- the basics


def test_batches_come_back_from_disk_in_chunks_and_leave_with_their_acks(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path, segment_batches=2)
    for i in range(5):
        spool.append(WORKER, records(f"r{i}"))
    assert [b.sequence for b in spool.pending_after(0, 2)] == [1, 2]
    assert [b.sequence for b in spool.pending_after(2, 64)] == [3, 4, 5]
    assert [r.request_id for r in spool.pending_after(3, 1)[0].records] == ["r3"] * 3
    spool.ack(3)
    assert (spool.backlog_batches, [b.sequence for b in spool.pending_after(0, 64)]) == (2, [4, 5])
    assert sorted(p.name for p in tmp_path.glob("seg-*")) == [
        "seg-0000000000000003.v2",
        "seg-0000000000000005.v2",
    ]
    spool.ack(5)
    # The segment being written stays for the next appends; a fresh spool replays none of it.
    assert spool.backlog_batches == 0
    assert [p.name for p in tmp_path.glob("seg-*")] == ["seg-0000000000000005.v2"]
    spool.append(WORKER, records("r5"))  # 6 fills it (and notes the ack of 5 on the way)
    assert replayed(tmp_path) == [(6, WORKER, ["r5"] * 3)]
    spool.ack(6)
    assert (spool.backlog_batches, spool.backlog_bytes, list(tmp_path.glob("seg-*"))) == (0, 0, [])
    assert UsageSpool(tmp_path).append(WORKER, records("after")) == 7  # numbering kept in state.json


def test_an_ack_of_the_segment_being_written_costs_no_file_work(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path)
    spool.append(WORKER, records("a"))
    segment = only_segment(tmp_path)
    inode = segment.stat().st_ino
    assert spool.mark_acked(1) is False  # nothing to remove: no thread hop needed
    spool.append(WORKER, records("b"))
    assert (only_segment(tmp_path), segment.stat().st_ino) == (segment, inode)
    assert not (tmp_path / "state.json").exists()  # only a removed segment needs numbering kept
    spool.close()  # a clean stop: what is acked goes
    assert [p.name for p in tmp_path.glob("seg-*")] == [segment.name]  # 2 is not acked yet
    assert replayed(tmp_path) == [(2, WORKER, ["b"] * 3)]


def test_fresh_batches_are_sent_from_memory_and_a_replayed_backlog_from_disk(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path)
    assert spool.pending_in_memory(0) == []
    spool.append(WORKER, records("a"))
    spool.append(WORKER, records("b"))
    assert [b.sequence for b in spool.pending_in_memory(0) or []] == [1, 2]
    assert [b.sequence for b in spool.pending_in_memory(1) or []] == [2]
    spool.ack(1)
    assert [b.sequence for b in spool.pending_in_memory(0) or []] == [2]
    spool.close()  # notes the ack of 1
    again = UsageSpool(tmp_path)
    assert again.pending_in_memory(0) is None  # 2 is only on disk now
    assert [b.sequence for b in again.pending_after(0)] == [2]


@pytest.mark.parametrize("note", ["kept", "lost", "torn"])
def test_acked_batches_are_not_replayed_unless_the_ack_note_is_lost(tmp_path: Path, note: str) -> None:
    spool = UsageSpool(tmp_path)
    for tag in ("a", "b", "c"):
        spool.append(WORKER, records(tag))
    spool.mark_acked(2)
    spool.append(WORKER, records("d"))  # notes the ack in acked.json, without an fsync
    if note == "lost":
        (tmp_path / "acked.json").unlink()
    elif note == "torn":
        (tmp_path / "acked.json").write_text('{"acked_seq')
    sent_again = [] if note == "kept" else [(1, WORKER, ["a"] * 3), (2, WORKER, ["b"] * 3)]
    assert replayed(tmp_path) == [*sent_again, (3, WORKER, ["c"] * 3), (4, WORKER, ["d"] * 3)]
    assert UsageSpool(tmp_path).append(WORKER, records("e")) == 5


def test_an_earlier_runs_acked_segment_is_removed_at_start_up(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path)
    spool.append(WORKER, records("a"))
    spool.mark_acked(1)
    spool.append(WORKER, records("b"))
    spool.mark_acked(2)
    spool.append(WORKER, records("c"))  # notes 2; then the worker dies before 3 is acked
    again = UsageSpool(tmp_path)
    assert [b.sequence for b in again.pending()] == [3]
    again.ack(3)  # the earlier run's segment is never written again: it goes with its last ack
    assert list(tmp_path.glob("seg-*")) == []
    assert UsageSpool(tmp_path).append(WORKER, records("d")) == 4


def test_a_clean_spool_replays_everything_once_and_copies_nothing_aside(tmp_path: Path) -> None:
    three_batches(tmp_path)
    spool = UsageSpool(tmp_path)
    assert [b.sequence for b in spool.pending()] == [1, 2, 3]
    assert (spool.damaged_frames, damaged_copies(tmp_path)) == (0, {})


# --- damage found at replay


@pytest.mark.parametrize("cut", ["in_the_body", "in_the_header"])
def test_a_truncated_tail_loses_only_the_torn_batch(tmp_path: Path, cut: str) -> None:
    segment = three_batches(tmp_path)
    start, end = frame_spans(segment)[2]
    keep = (start + end) // 2 if cut == "in_the_body" else start + 10
    os.truncate(segment, keep)
    spool = UsageSpool(tmp_path)
    assert spool.damaged_frames == 1
    if cut == "in_the_body":  # its header tells that 3 existed: it is replayed empty, and not reused
        assert replayed(tmp_path) == [(1, WORKER, ["a"] * 3), (2, WORKER, ["b"] * 3), (3, WORKER, [])]
        assert spool.append(WORKER, records("d")) == 4
    else:  # nothing tells that 3 existed (the documented gap): still nothing before it is lost
        assert replayed(tmp_path) == [(1, WORKER, ["a"] * 3), (2, WORKER, ["b"] * 3)]
        assert spool.append(WORKER, records("d")) == 3
    assert damaged_copies(tmp_path) == {f"damaged-{segment.name}-{start}.bin": segment.read_bytes()[start:]}


# Offsets inside the middle frame's header: magic, sequence, body length, body crc, header crc.
@pytest.mark.parametrize("where", [0, 5, 13, 17, 21, "body"])
def test_a_flipped_byte_in_the_middle_batch_loses_only_that_batch(
    tmp_path: Path, where: int | str, caplog: pytest.LogCaptureFixture
) -> None:
    segment = three_batches(tmp_path)
    size = segment.stat().st_size
    start, end = frame_spans(segment)[1]
    original = segment.read_bytes()[start:end]
    flip(segment, start + (frames.HEADER.size + 3 if where == "body" else int(where)))
    with caplog.at_level(logging.WARNING, logger="openlora.usage"):
        spool = UsageSpool(tmp_path)
    # 1 and 3 once each, 2 replayed empty (under the worker id of its neighbours) so acks can pass it.
    assert [(b.sequence, b.worker_id, len(b.records)) for b in spool.pending_after(0, 64)] == [
        (1, WORKER, 3),
        (2, WORKER, 0),
        (3, WORKER, 3),
    ]
    assert spool.damaged_frames == 1
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    (copy,) = damaged_copies(tmp_path).values()
    assert len(copy) == len(original) and copy != original  # the damaged frame, as it is on disk
    assert segment.stat().st_size == size  # replay cuts nothing off
    assert spool.append(WORKER, records("d")) == 4
    spool.ack(4)
    spool.close()
    assert list(tmp_path.glob("seg-*")) == []


def test_a_flipped_byte_in_the_first_header_is_placed_by_the_segment_name(tmp_path: Path) -> None:
    segment = three_batches(tmp_path)
    flip(segment, 9)
    assert [(s, len(r)) for s, _, r in replayed(tmp_path)] == [(1, 0), (2, 3), (3, 3)]


def test_every_intact_batch_after_several_damaged_ones_is_replayed(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path)
    for i in range(8):
        spool.append(WORKER, records(f"r{i}"))
    segment = only_segment(tmp_path)
    spans = frame_spans(segment)
    for i in (1, 2, 5):
        flip(segment, spans[i][0] + frames.HEADER.size + 1)
    flip(segment, spans[6][0] + 2)  # magic: the header is gone too
    again = UsageSpool(tmp_path)
    assert [(s, len(r)) for s, _, r in replayed(tmp_path)] == [
        (i + 1, 0 if i in (1, 2, 5, 6) else 3) for i in range(8)
    ]
    assert again.damaged_frames == 4


def test_a_missing_middle_segment_is_filled_with_empty_batches(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path, segment_batches=2)
    for i in range(6):
        spool.append(WORKER, records(f"r{i}"))
    (tmp_path / "seg-0000000000000003.v2").unlink()
    assert [(s, w, len(r)) for s, w, r in replayed(tmp_path)] == [
        (1, WORKER, 3),
        (2, WORKER, 3),
        (3, WORKER, 0),
        (4, WORKER, 0),
        (5, WORKER, 3),
        (6, WORKER, 3),
    ]


@pytest.mark.parametrize("cut", ["emptied", "last_header_torn"])
def test_numbering_stays_above_state_json(tmp_path: Path, cut: str) -> None:
    spool = UsageSpool(tmp_path, segment_batches=2)
    for i in range(4):
        spool.append(WORKER, records(f"r{i}"))
    spool.ack(2)  # deletes the first segment and writes state.json (next 5)
    segment = only_segment(tmp_path)
    os.truncate(segment, 0 if cut == "emptied" else frame_spans(segment)[1][0] + 5)
    again = UsageSpool(tmp_path)
    if cut == "emptied":  # the empty segment is dropped; state.json still knows 3 and 4 were used
        assert again.backlog_batches == 0
    else:  # 4's header is gone, but state.json says it was handed out: it is replayed empty
        assert [(s, len(r)) for s, _, r in replayed(tmp_path)] == [(3, 3), (4, 0)]
    assert again.append(WORKER, records("x")) == 5


def test_lost_batches_with_no_intact_neighbour_wait_for_the_first_append_worker_id(tmp_path: Path) -> None:
    segment = three_batches(tmp_path)
    for start, _ in frame_spans(segment):
        flip(segment, start + frames.HEADER.size + 1)
    spool = UsageSpool(tmp_path)
    assert (spool.backlog_batches, spool.pending_after(0, 64)) == (3, [])
    assert spool.append("worker-b", records("d")) == 4
    assert [(b.sequence, b.worker_id, len(b.records)) for b in spool.pending_after(0, 64)] == [
        (1, "worker-b", 0),
        (2, "worker-b", 0),
        (3, "worker-b", 0),
        (4, "worker-b", 3),
    ]


# --- short writes


def failing_write(monkeypatch: pytest.MonkeyPatch, *, half: bool = True) -> None:
    """The next os.write writes half its bytes (or all of them), then the disk is full."""
    real = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        monkeypatch.setattr(os, "write", real)
        if half:
            real(fd, bytes(data)[: len(data) // 2])
        else:
            real(fd, data)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)


def cannot_truncate(fd: int, size: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_a_failed_write_is_cut_back_and_its_retry_replays_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = UsageSpool(tmp_path)
    spool.append(WORKER, records("a"))
    size = spool.backlog_bytes
    failing_write(monkeypatch)
    with pytest.raises(SpoolFull):
        spool.append(WORKER, records("b"))
    assert only_segment(tmp_path).stat().st_size == size == spool.backlog_bytes
    assert spool.append(WORKER, records("b")) == 2  # the failed one was never handed out
    assert spool.append(WORKER, records("c")) == 3
    assert [(s, r[0]) for s, _, r in replayed(tmp_path)] == [(1, "a"), (2, "b"), (3, "c")]
    assert UsageSpool(tmp_path).damaged_frames == 0


def test_a_short_write_that_could_not_be_cut_back_replays_its_retry_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = UsageSpool(tmp_path)
    spool.append(WORKER, records("a"))
    failing_write(monkeypatch)
    monkeypatch.setattr(os, "ftruncate", cannot_truncate)
    with pytest.raises(SpoolFull):
        spool.append(WORKER, records("b"))
    monkeypatch.undo()
    assert spool.append(WORKER, records("b", 5)) == 2
    spool.append(WORKER, records("c"))
    again = UsageSpool(tmp_path)
    assert [(s, r) for s, _, r in replayed(tmp_path)] == [(1, ["a"] * 3), (2, ["b"] * 5), (3, ["c"] * 3)]
    assert again.damaged_frames == 1
    assert again.append(WORKER, records("d")) == 4


def test_of_two_intact_copies_of_a_sequence_the_retry_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = UsageSpool(tmp_path)
    spool.append(WORKER, records("a"))
    failing_write(monkeypatch, half=False)  # every byte written, then the error: the frame is intact
    monkeypatch.setattr(os, "ftruncate", cannot_truncate)
    with pytest.raises(SpoolFull):
        spool.append(WORKER, records("b"))
    monkeypatch.undo()
    spool.append(WORKER, records("b") + records("more"))
    assert [(s, len(r)) for s, _, r in replayed(tmp_path)] == [(1, 3), (2, 6)]


def test_a_hand_written_partial_frame_then_its_rewrite_replays_once(tmp_path: Path) -> None:
    three_batches(tmp_path)
    segment = only_segment(tmp_path)
    body = attribution_pb2.UsageBatch(sequence=4, worker_id=WORKER, records=records("d")).SerializeToString()
    frame = frames.encode(4, body)
    with open(segment, "ab") as out:
        out.write(frame[: len(frame) - 7] + frame)
    assert [(s, r[0]) for s, _, r in replayed(tmp_path)] == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    assert UsageSpool(tmp_path).append(WORKER, records("e")) == 5


# --- damage found when reading the backlog


def test_a_batch_damaged_after_replay_comes_back_empty_and_is_counted_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = three_batches(tmp_path)
    spool = UsageSpool(tmp_path)
    flip(segment, frame_spans(segment)[0][1] - 1)
    with caplog.at_level(logging.WARNING, logger="openlora.usage"):
        for _ in range(2):
            assert [len(b.records) for b in spool.pending_after(0, 64)] == [0, 3, 3]
    assert spool.damaged_frames == 1
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    assert len(damaged_copies(tmp_path)) == 1


# --- legacy segments


def legacy_frame(sequence: int, tag: str) -> bytes:
    body = attribution_pb2.UsageBatch(
        sequence=sequence, worker_id=WORKER, records=records(tag)
    ).SerializeToString()
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def test_a_legacy_segment_is_replayed_and_acked_away(tmp_path: Path) -> None:
    legacy = tmp_path / "seg-0000000000000001.log"
    legacy.write_bytes(legacy_frame(1, "a") + legacy_frame(2, "b") + b"\x10\x00\x00\x00torn")
    spool = UsageSpool(tmp_path)
    assert [(b.sequence, b.records[0].request_id) for b in spool.pending_after(0, 64)] == [(1, "a"), (2, "b")]
    assert spool.damaged_frames == 1  # the torn tail, copied aside
    assert spool.append(WORKER, records("c")) == 3
    assert (tmp_path / "seg-0000000000000003.v2").exists()  # new batches go to new-format segments
    assert [b.sequence for b in UsageSpool(tmp_path).pending()] == [1, 2, 3]
    spool.ack(3)
    assert [p.name for p in tmp_path.glob("seg-*")] == ["seg-0000000000000003.v2"]  # still being written
    spool.close()
    assert list(tmp_path.glob("seg-*")) == []


# --- memory


def reachable(root: object) -> Iterator[object]:
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType):
            continue
        seen.add(id(obj))
        yield obj
        stack.extend(gc.get_referents(obj))


def test_the_backlog_stays_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # 2,000 real fsyncs would only slow the test
    spool = UsageSpool(tmp_path)
    for i in range(2000):
        spool.append(WORKER, records(f"r{i}"))
    for held, in_memory in ((spool, RECENT_BATCHES), (UsageSpool(tmp_path), 0)):
        assert held.backlog_batches == 2000
        # The newest few for the sender, then nothing a long outage could grow.
        assert sum(isinstance(obj, attribution_pb2.UsageBatch) for obj in reachable(held)) == in_memory
        assert [b.sequence for b in held.pending_after(0, 64)] == list(range(1, 65))
        assert [b.records[0].request_id for b in held.pending_after(1990, 64)] == [
            f"r{i}" for i in range(1990, 2000)
        ]
