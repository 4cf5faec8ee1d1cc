"""Streams spooled usage batches to attribution over a long-lived `StreamUsage` call.

`track()` takes a request's `RequestUsage`, which counts its tokens as they are streamed; `record()`
takes ready records. Neither blocks generation: every flush interval the flusher takes what each
tracked request counted since the last flush (one range per request and kind) and the records
recorded, and writes them as one durable spool batch. The sender keeps one stream open, sends every
unacked batch (all of them again after a reconnect: attribution is idempotent on each record's key)
and drops batches from the spool as acks arrive. Attribution being down only grows the spool; a full
spool is an alarm (log + `stats`), and its records wait in memory for room.

Between flushes, what tracked requests counted is also written to the journal beside the spool
(`journal.py`) before their chunks leave, and recovered into the spool at the next start: a worker
killed between two flushes loses no token its clients received. A taken record keeps its range (it is
never joined with another) so the journal and the spool agree on its key.

A flush costs one hop to a thread (the append and its fsync): the sender takes fresh batches from
the spool's memory, and an ack is bookkeeping. On a small host every thread hand-off and wake-up
costs more CPU than the records themselves (`bench/RESULTS.md`).

Records attribution refuses are never resent: an ack names them, and they go to the dead-letter file
beside the spool (`dead_letter.py`) before the spool lets their batch go. A batch refused whole (the
stream ends INVALID_ARGUMENT) is dead-lettered entirely and sent again empty under its sequence, so
attribution's contiguous ack moves past it. Both loops are supervised: an unexpected error is logged,
counted in `stats`, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from openlora.v1 import attribution_pb2, attribution_pb2_grpc

from services.common.grpc_client import ClientTLS, open_channel
from services.common.trust.credentials import ServiceIdentity
from services.inference.usage.dead_letter import DeadLetter, DeadLetterFile
from services.inference.usage.journal import UsageJournal, journal_files, recover
from services.inference.usage.records import RequestUsage
from services.inference.usage.spool import SpoolFull, UsageSpool

log = logging.getLogger("openlora.usage")


def join_ranges(records: list[attribution_pb2.TokenUsage]) -> list[attribution_pb2.TokenUsage]:
    """One record per request and kind where its ranges follow each other: what a flush sends is one
    range per request, however many steps produced it. Ranges join only within one minute of their
    stamps, so the ledger's per-minute counts stay exact. Extends the records in place: the reporter
    owns what `record()` was given."""
    joined: list[attribution_pb2.TokenUsage] = []
    last: dict[tuple[str, int], attribution_pb2.TokenUsage] = {}
    for record in records:
        key = (record.request_id, record.kind)
        previous = last.get(key)
        count = record.token_count or 1
        if (
            previous is not None
            and previous.token_index + previous.token_count == record.token_index
            and previous.ts.seconds // 60 == record.ts.seconds // 60
            and previous.tenant == record.tenant
            and previous.adapters == record.adapters
        ):
            previous.token_count += count
            continue
        record.token_count = count
        joined.append(record)
        last[key] = record
    return joined


@dataclass
class ReporterStats:
    records_buffered: int = 0
    batches_spooled: int = 0
    acked_sequence: int = 0
    reconnects: int = 0
    spool_full_alarms: int = 0
    connected: bool = False
    send_errors: int = 0  # unexpected errors the sender was restarted after
    flush_errors: int = 0


class UsageReporter:
    def __init__(
        self,
        spool: UsageSpool,
        target: str,
        worker_id: str,
        *,
        identity: ServiceIdentity | None = None,
        tls: ClientTLS | None = None,
        max_batch_records: int = 4096,
        flush_interval_s: float = 0.05,
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self.spool = spool
        self.target = target
        self.worker_id = worker_id
        self.identity = identity
        self.tls = tls
        self.max_batch_records = max_batch_records
        self.flush_interval_s = flush_interval_s
        self.backoff_s = backoff_s
        self.stats = ReporterStats()
        self._buffer: collections.deque[attribution_pb2.TokenUsage] = collections.deque()  # from record()
        self._taken: collections.deque[attribution_pb2.TokenUsage] = collections.deque()  # from tracked
        self.journal: UsageJournal | None = None  # from start() on
        self._tracked: dict[int, RequestUsage] = {}  # by id(): requests whose tokens are counted
        self._spooled = asyncio.Event()
        self._acked = asyncio.Event()
        self._stopping = False
        self._spool_full = False
        self._tasks: list[asyncio.Task[None]] = []
        self.dead_letters = DeadLetterFile(spool.directory)
        self._unanswered: collections.deque[int] = collections.deque()  # sent on this stream, no ack yet
        self._emptied: set[int] = set()  # sequences refused whole: sent again without their records
        self._dead_lettered: set[int] = set()  # sequences whose refusals this process has written

    def record(self, records: Iterable[attribution_pb2.TokenUsage]) -> None:
        """Queue token records, which the reporter then owns (thread-safe, never blocks: deque
        appends are atomic)."""
        self._buffer.extend(records)

    def track(self, usage: RequestUsage) -> None:
        """Report what `usage` counts, at every flush, until it is closed and its rest taken."""
        self._tracked[id(usage)] = usage
        if self.journal is not None:
            usage.journal = self.journal
            self.journal.begin(usage)

    def _take_tracked(self) -> None:
        tracked = self._tracked
        for key, usage in list(tracked.items()):
            if usage.has_untaken:
                self._taken.extend(usage.take())
            if usage.closed:
                del tracked[key]
                if self.journal is not None and usage.finished:
                    self.journal.end(usage)  # nothing was left to spool

    async def start(self) -> None:
        """Recover what an earlier run journaled into the spool, then start journaling, flushing and
        sending."""
        recovered = await asyncio.to_thread(self._recover_journal)
        if recovered:
            log.info("usage journal: %d record(s) of an earlier run recovered into the spool", recovered)
        self.journal = await asyncio.to_thread(UsageJournal, self.spool.directory)
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._send_loop())]

    def _recover_journal(self) -> int:
        files = journal_files(self.spool.directory)
        if not files:
            return 0
        records = recover(self.spool.directory)
        for start in range(0, len(records), self.max_batch_records):
            # A full disk raises here and the worker does not start: the journal is all that holds
            # those tokens, and an operator must make room.
            self.spool.append(self.worker_id, records[start : start + self.max_batch_records])
        self.spool.seal()
        for path in files:
            path.unlink()
        return len(records)

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Spool what is buffered, give the sender a moment to get it acked, then stop."""
        self._stopping = True
        await self._flush()
        if self.journal is not None:
            self.journal.close(everything_spooled=not (self._taken or self._buffer))
        deadline = time.monotonic() + drain_timeout_s
        while self.spool.backlog_batches and self.stats.connected:
            self._acked.clear()
            try:
                await asyncio.wait_for(self._acked.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break  # what is left stays in the spool and is replayed at the next start
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.spool.close)

    # --- buffer -> spool

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # the records stay buffered; the next flush tries again
                self.stats.flush_errors += 1
                log.exception("usage flush failed")

    async def _flush(self) -> None:
        self._take_tracked()
        limit = self.max_batch_records
        while self._taken or self._buffer:
            recorded = join_ranges([self._buffer.popleft() for _ in range(min(len(self._buffer), limit))])
            room = min(len(self._taken), limit - len(recorded))
            taken = [self._taken.popleft() for _ in range(room)]
            try:
                await asyncio.to_thread(self.spool.append, self.worker_id, recorded + taken)
            except SpoolFull as exc:
                # Keep them, oldest first, for the next try.
                self._taken.extendleft(reversed(taken))
                self._buffer.extendleft(reversed(recorded))
                self.stats.spool_full_alarms += 1
                # Once per episode: retried every flush interval, it would flood the log.
                if not self._spool_full:
                    log.error("usage spool full; %d records wait in memory: %s", self._waiting, exc)
                self._spool_full = True
                break
            if self._spool_full:
                log.warning("usage spool has room again; %d records wait in memory", self._waiting)
                self._spool_full = False
            if self.journal is not None:
                self.journal.spooled(taken)
            self.stats.batches_spooled += 1
            self._spooled.set()
        self.stats.records_buffered = self._waiting

    @property
    def _waiting(self) -> int:
        return len(self._taken) + len(self._buffer)

    # --- spool -> attribution

    async def _send_loop(self) -> None:
        """Keep one stream open; whatever ends it is logged, counted and followed by a new one."""
        delay = self.backoff_s[0]
        while True:
            try:
                await self._stream_once()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and await self._refused_whole(exc):
                    delay = self.backoff_s[0]
                    continue  # the refused batch is set aside: resend the rest at once
                log.warning(
                    "usage stream to %s broke (%s); retrying in %.1fs", self.target, exc.code().name, delay
                )
            except ConnectionError as exc:
                log.warning("usage stream to %s broke (%s); retrying in %.1fs", self.target, exc, delay)
            except Exception:
                # A bug here must not silently end usage reporting for the life of the worker.
                self.stats.send_errors += 1
                log.exception("usage sender failed; restarting it in %.1fs", delay)
            self.stats.connected = False
            self.stats.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    async def _stream_once(self) -> None:
        self._unanswered.clear()
        async with open_channel(
            self.target, tls=self.tls, identity=self.identity, audience="attribution"
        ) as channel:
            call = attribution_pb2_grpc.AttributionStub(channel).StreamUsage()
            writer = asyncio.create_task(self._write_pending(call))
            # A writer that fails ends the call, or the read below would wait for acks forever.
            writer.add_done_callback(
                lambda task: task.cancelled() or task.exception() is None or call.cancel()
            )
            try:
                while (ack := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(ack, attribution_pb2.RecordAck)
                    await self._on_ack(ack)
            finally:
                writer.cancel()
                failure: Exception | None = None
                try:
                    await writer
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # close() cancelled this task while it waited: swallowed, it never ends
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass  # the call ended under the writer (or just before a write): the read says why
                except Exception as exc:
                    failure = exc
                if failure is not None:
                    raise failure
            raise ConnectionError("attribution ended the usage stream")

    async def _on_ack(self, ack: attribution_pb2.RecordAck) -> None:
        self.stats.connected = True
        answered = self._unanswered.popleft() if self._unanswered else ack.sequence
        if ack.refused:
            await self._dead_letter(ack.sequence or answered, list(ack.refused), "")
        self.stats.acked_sequence = max(self.stats.acked_sequence, ack.acked_sequence)
        if self.spool.mark_acked(ack.acked_sequence):  # a finished segment to remove, now and then
            await asyncio.to_thread(self.spool.drop_acked_segments)
        self._emptied = {s for s in self._emptied if s > ack.acked_sequence}
        self._dead_lettered = {s for s in self._dead_lettered if s > ack.acked_sequence}
        self._acked.set()

    async def _refused_whole(self, exc: grpc.aio.AioRpcError) -> bool:
        """Attribution refused a whole batch (acks come in order: the first one unanswered). Its
        records are dead-lettered and an empty batch takes its sequence, so the acks move on."""
        if not self._unanswered:
            return False
        sequence = self._unanswered[0]
        reason = exc.details() or "refused"
        await self._dead_letter(sequence, None, reason)
        self._emptied.add(sequence)
        return True

    async def _dead_letter(
        self, sequence: int, refused: list[attribution_pb2.RefusedRecord] | None, reason: str
    ) -> None:
        """Write a batch's refused records (all of them when `refused` is None) to the dead letters."""
        if sequence in self._dead_lettered:
            return  # already written by this process: a resend refused again
        batches = await asyncio.to_thread(self.spool.pending_after, sequence - 1, 1)
        batch = batches[0] if batches and batches[0].sequence == sequence else None
        records = list(batch.records) if batch is not None else []
        if refused is None:
            refused = [
                attribution_pb2.RefusedRecord(sequence=sequence, index=i, field="batch", reason=reason)
                for i in range(len(records))
            ]
        letters = [
            DeadLetter(
                sequence,
                r.index,
                r.field,
                r.reason,
                records[r.index] if r.index < len(records) else None,
            )
            for r in refused
        ]
        await asyncio.to_thread(self.dead_letters.write, letters)
        self._dead_lettered.add(sequence)

    async def _pending_after(self, sent: int) -> list[attribution_pb2.UsageBatch]:
        batches = self.spool.pending_in_memory(sent, 64)
        if batches is None:  # a backlog on disk (an earlier run's, a long outage): read off the event loop
            batches = await asyncio.to_thread(self.spool.pending_after, sent, 64)
        return batches

    async def _write_pending(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        sent = 0
        while True:
            self._spooled.clear()
            while batches := await self._pending_after(sent):
                for batch in batches:
                    if batch.sequence in self._emptied:
                        batch = attribution_pb2.UsageBatch(sequence=batch.sequence, worker_id=batch.worker_id)
                    self._unanswered.append(batch.sequence)
                    await call.write(batch)
                    sent = batch.sequence
            await self._spooled.wait()
